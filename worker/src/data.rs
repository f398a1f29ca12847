//! Reading text data sets: JSONL (one object per line) and CSV (header row).
//! Errors name the file and line: non-UTF-8 bytes, malformed JSON, a missing
//! or non-string text field, an empty file.

use crate::{Error, Result};
use std::path::Path;

/// One example: its text, optional second segment, optional label as text.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub text: String,
    pub text_pair: Option<String>,
    pub label: Option<String>,
    /// 1-based line of the example in its file.
    pub line: usize,
}

/// Which fields hold what.
#[derive(Debug, Clone)]
pub struct Fields {
    pub text: String,
    pub text_pair: Option<String>,
    pub label: Option<String>,
}

impl Default for Fields {
    fn default() -> Self {
        Fields {
            text: "text".into(),
            text_pair: None,
            label: Some("label".into()),
        }
    }
}

fn err(path: &Path, line: usize, message: impl std::fmt::Display) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        message: format!("line {line}: {message}"),
    }
}

/// Read a JSONL or CSV file (by extension). A label field that is absent
/// from a row gives `label: None` (unlabelled).
pub fn read_examples(path: &Path, fields: &Fields) -> Result<Vec<Example>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = match std::str::from_utf8(&bytes) {
        Ok(t) => t,
        Err(e) => {
            let line = bytes[..e.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1;
            return Err(err(path, line, "not valid UTF-8"));
        }
    };
    let is_csv = path
        .extension()
        .map(|e| e.eq_ignore_ascii_case("csv"))
        .unwrap_or(false);
    let examples = if is_csv {
        read_csv(path, text, fields)?
    } else {
        read_jsonl(path, text, fields)?
    };
    if examples.is_empty() {
        return Err(Error::Data {
            path: path.to_path_buf(),
            message: "no examples in file".into(),
        });
    }
    Ok(examples)
}

fn value_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn read_jsonl(path: &Path, text: &str, fields: &Fields) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| err(path, n, format!("invalid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| err(path, n, "expected a JSON object"))?;
        let get_str = |f: &str| -> Result<String> {
            match obj.get(f) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(err(path, n, format!("field {f}: expected a string"))),
                None => Err(err(path, n, format!("field {f}: missing"))),
            }
        };
        let text = get_str(&fields.text)?;
        let text_pair = fields.text_pair.as_deref().map(get_str).transpose()?;
        let label =
            match fields
                .label
                .as_deref()
                .and_then(|f| obj.get(f).map(|v| (f, v)))
            {
                None | Some((_, serde_json::Value::Null)) => None,
                Some((f, v)) => Some(value_text(v).ok_or_else(|| {
                    err(path, n, format!("field {f}: expected a string or number"))
                })?),
            };
        out.push(Example {
            text,
            text_pair,
            label,
            line: n,
        });
    }
    Ok(out)
}

/// Minimal RFC 4180 CSV: quoted fields may hold commas, quotes ("") and newlines.
fn parse_csv(text: &str) -> Vec<(usize, Vec<String>)> {
    let mut rows = Vec::new();
    let (mut row, mut field, mut quoted, mut line, mut start) =
        (Vec::new(), String::new(), false, 1, 1);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            ('"', true) => quoted = false,
            ('"', false) if field.is_empty() => quoted = true,
            (',', false) => row.push(std::mem::take(&mut field)),
            ('\n', false) => {
                row.push(std::mem::take(&mut field));
                rows.push((start, std::mem::take(&mut row)));
                line += 1;
                start = line;
            }
            ('\r', false) => {}
            (c, _) => {
                if c == '\n' {
                    line += 1;
                }
                field.push(c);
            }
        }
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push((start, row));
    }
    rows
}

fn read_csv(path: &Path, text: &str, fields: &Fields) -> Result<Vec<Example>> {
    let mut rows = parse_csv(text).into_iter();
    let Some((_, header)) = rows.next() else {
        return Ok(vec![]);
    };
    let col = |f: &str| header.iter().position(|h| h.trim() == f);
    let text_col = col(&fields.text)
        .ok_or_else(|| err(path, 1, format!("no column named {}", fields.text)))?;
    let pair_col = match &fields.text_pair {
        Some(f) => Some(col(f).ok_or_else(|| err(path, 1, format!("no column named {f}")))?),
        None => None,
    };
    let label_col = fields.label.as_deref().and_then(col);
    let mut out = Vec::new();
    for (line, row) in rows {
        if row.len() == 1 && row[0].trim().is_empty() {
            continue;
        }
        if row.len() != header.len() {
            return Err(err(
                path,
                line,
                format!("expected {} columns, found {}", header.len(), row.len()),
            ));
        }
        let label = label_col.map(|c| row[c].clone()).filter(|l| !l.is_empty());
        out.push(Example {
            text: row[text_col].clone(),
            text_pair: pair_col.map(|c| row[c].clone()),
            label,
            line,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, bytes: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        (d, p)
    }

    #[test]
    fn reads_jsonl_and_csv() {
        let (_d, p) = write("a.jsonl", b"{\"text\": \"good\", \"label\": \"pos\"}\n\n{\"text\": \"meh\", \"label\": 0}\n{\"text\": \"x\"}\n");
        let ex = read_examples(&p, &Fields::default()).unwrap();
        assert_eq!(ex.len(), 3);
        assert_eq!(ex[1].label.as_deref(), Some("0"));
        assert_eq!(ex[2].label, None);
        let (_d, p) = write(
            "a.csv",
            b"label,text\npos,\"hello, \"\"world\"\"\"\nneg,\"two\nlines\"\n",
        );
        let ex = read_examples(&p, &Fields::default()).unwrap();
        assert_eq!(ex[0].text, "hello, \"world\"");
        assert_eq!(ex[1].text, "two\nlines");
        assert_eq!(ex[1].label.as_deref(), Some("neg"));
    }

    #[test]
    fn bad_data_names_file_and_line() {
        let (_d, p) = write("bad.jsonl", b"{\"text\": \"ok\"}\n{\"text\": 3}\n");
        let e = read_examples(&p, &Fields::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bad.jsonl") && e.contains("line 2") && e.contains("field text"),
            "{e}"
        );
        let (_d, p) = write(
            "bin.jsonl",
            b"{\"text\": \"ok\"}\n{\"text\": \"\xff\xfe\"}\n",
        );
        let e = read_examples(&p, &Fields::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("UTF-8"), "{e}");
        let (_d, p) = write("empty.jsonl", b"\n");
        assert!(read_examples(&p, &Fields::default())
            .unwrap_err()
            .to_string()
            .contains("no examples"));
        let (_d, p) = write("broken.jsonl", b"{\"text\": \n");
        assert!(read_examples(&p, &Fields::default())
            .unwrap_err()
            .to_string()
            .contains("invalid JSON"));
    }
}
