//! distill-data: reading text data sets, JSONL (one object per line) and
//! CSV (header row, RFC 4180 quoting), for the coordinator (which plans
//! shards from the number of examples) and the worker (which reads them),
//! so both count the same examples in the same order.
//!
//! Errors name the file and line: non-UTF-8 bytes, malformed JSON, a
//! missing or non-string text field, an empty file. With
//! [`BadExample::Skip`] a bad line is skipped and recorded instead.
//!
//! What it must never do: link libtorch (the coordinator uses it).

use distill_spec::{BadExample, JobSpec};
use std::path::{Path, PathBuf};

/// A data file that cannot be read as asked, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Data { path: PathBuf, message: String },
    /// Which spec field named the file.
    #[error("{field}: {source}")]
    Field {
        field: &'static str,
        #[source]
        source: Box<Error>,
    },
}

impl Error {
    fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A line that was skipped under [`BadExample::Skip`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub path: PathBuf,
    /// 1-based line in the file.
    pub line: usize,
    pub reason: String,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: line {}: {}",
            self.path.display(),
            self.line,
            self.reason
        )
    }
}

/// The examples of a file, and the lines skipped as bad.
#[derive(Debug, Clone, Default)]
pub struct Read {
    pub examples: Vec<Example>,
    pub skipped: Vec<Skipped>,
}

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

/// Read a JSONL or CSV file (by extension); the first bad example is an
/// error naming file and line. A label field that is absent from a row
/// gives `label: None` (unlabelled).
pub fn read_examples(path: &Path, fields: &Fields) -> Result<Vec<Example>> {
    Ok(read_with(path, fields, BadExample::Fail)?.examples)
}

/// [`read_examples`] under a bad-example policy: with
/// [`BadExample::Skip`], a line with invalid UTF-8, malformed JSON or a
/// missing field is skipped and listed in [`Read::skipped`] (never silently
/// dropped). A file with no examples left is an error either way.
pub fn read_with(path: &Path, fields: &Fields, policy: BadExample) -> Result<Read> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut skipped = Vec::new();
    let text: std::borrow::Cow<str> = match std::str::from_utf8(&bytes) {
        Ok(t) => t.into(),
        Err(_) => {
            // Line by line, so a skip drops only the bad lines.
            let mut out = String::with_capacity(bytes.len());
            for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
                match std::str::from_utf8(raw) {
                    Ok(l) => out.push_str(l),
                    Err(_) if policy == BadExample::Skip => skipped.push(Skipped {
                        path: path.to_path_buf(),
                        line: i + 1,
                        reason: "not valid UTF-8".into(),
                    }),
                    Err(_) => return Err(err(path, i + 1, "not valid UTF-8")),
                }
                out.push('\n');
            }
            out.pop();
            out.into()
        }
    };
    let is_csv = path
        .extension()
        .map(|e| e.eq_ignore_ascii_case("csv"))
        .unwrap_or(false);
    let mut bad = |line: usize, e: Error| -> Result<()> {
        match policy {
            BadExample::Fail => Err(e),
            BadExample::Skip => {
                let reason = match e {
                    Error::Data { message, .. } => message
                        .strip_prefix(&format!("line {line}: "))
                        .map(String::from)
                        .unwrap_or(message),
                    other => other.to_string(),
                };
                skipped.push(Skipped {
                    path: path.to_path_buf(),
                    line,
                    reason,
                });
                Ok(())
            }
        }
    };
    let examples = if is_csv {
        read_csv(path, &text, fields, &mut bad)?
    } else {
        read_jsonl(path, &text, fields, &mut bad)?
    };
    if examples.is_empty() {
        return Err(Error::Data {
            path: path.to_path_buf(),
            message: "no examples in file".into(),
        });
    }
    skipped.sort_by_key(|s| s.line);
    Ok(Read { examples, skipped })
}

/// The fields a job's spec reads.
pub fn fields(spec: &JobSpec, with_labels: bool) -> Fields {
    Fields {
        text: spec.data.text_field.clone(),
        text_pair: spec.data.text_pair_field.clone(),
        label: with_labels.then(|| spec.data.label_field.clone()),
    }
}

/// The training examples of a job in their global order: `data.train`,
/// then `data.unlabelled` (whose labels are not read). Shard `[start, end)`
/// of a job means these examples; the coordinator plans from their count
/// and the worker reads them, through this one function.
pub fn training_examples(spec: &JobSpec) -> Result<Read> {
    let mut all = Read::default();
    let files = [
        // Labels are read (and so can be bad) only where the task has them.
        (
            "data.train",
            &spec.data.train,
            spec.task.is_classification(),
        ),
        ("data.unlabelled", &spec.data.unlabelled, false),
    ];
    for (field, path, labels) in files {
        if let Some(p) = path {
            let r = read_with(
                Path::new(p),
                &fields(spec, labels),
                spec.data.on_bad_example,
            )
            .map_err(|e| Error::Field {
                field,
                source: Box::new(e),
            })?;
            all.examples.extend(r.examples);
            all.skipped.extend(r.skipped);
        }
    }
    Ok(all)
}

fn value_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

type OnBad<'a> = &'a mut dyn FnMut(usize, Error) -> Result<()>;

fn read_jsonl(path: &Path, text: &str, fields: &Fields, bad: OnBad) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        match jsonl_example(path, line, n, fields) {
            Ok(e) => out.push(e),
            Err(e) => bad(n, e)?,
        }
    }
    Ok(out)
}

fn jsonl_example(path: &Path, line: &str, n: usize, fields: &Fields) -> Result<Example> {
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
    let label = match fields
        .label
        .as_deref()
        .and_then(|f| obj.get(f).map(|v| (f, v)))
    {
        None | Some((_, serde_json::Value::Null)) => None,
        Some((f, v)) => Some(
            value_text(v)
                .ok_or_else(|| err(path, n, format!("field {f}: expected a string or number")))?,
        ),
    };
    Ok(Example {
        text,
        text_pair,
        label,
        line: n,
    })
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

fn read_csv(path: &Path, text: &str, fields: &Fields, bad: OnBad) -> Result<Vec<Example>> {
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
            bad(
                line,
                err(
                    path,
                    line,
                    format!("expected {} columns, found {}", header.len(), row.len()),
                ),
            )?;
            continue;
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
    fn skip_policy_skips_and_lists_every_bad_line() {
        let (_d, p) = write(
            "mixed.jsonl",
            b"{\"text\": \"ok\"}\n{\"text\": \"\xff\"}\n\n{\"txt\": \"x\"}\n{broken\n{\"text\": \"fine\"}\n",
        );
        let r = read_with(&p, &Fields::default(), BadExample::Skip).unwrap();
        let texts: Vec<_> = r
            .examples
            .iter()
            .map(|e| (e.line, e.text.as_str()))
            .collect();
        assert_eq!(texts, [(1, "ok"), (6, "fine")]);
        let why: Vec<_> = r
            .skipped
            .iter()
            .map(|s| (s.line, s.reason.as_str()))
            .collect();
        assert_eq!(why.len(), 3, "{why:?}");
        assert_eq!(why[0], (2, "not valid UTF-8"));
        assert_eq!(why[1], (4, "field text: missing"));
        assert!(
            why[2].0 == 5 && why[2].1.starts_with("invalid JSON"),
            "{why:?}"
        );
        assert!(r.skipped[1]
            .to_string()
            .contains("mixed.jsonl: line 4: field text: missing"));
        // The same file under the fail policy stops at the first bad line.
        let e = read_with(&p, &Fields::default(), BadExample::Fail)
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("UTF-8"), "{e}");
        // CSV: a row with the wrong number of columns.
        let (_d, p) = write("rows.csv", b"text,label\na,pos\nb,neg,extra\nc,neg\n");
        let r = read_with(&p, &Fields::default(), BadExample::Skip).unwrap();
        assert_eq!(r.examples.len(), 2);
        assert_eq!(r.skipped[0].line, 3);
        assert!(read_with(&p, &Fields::default(), BadExample::Fail).is_err());
    }

    #[test]
    fn csv_counts_examples_not_lines() {
        // A header and a quoted newline: 2 examples over 4 lines.
        let (_d, p) = write("q.csv", b"text,label\n\"two\nlines\",pos\nthree,neg\n");
        assert_eq!(read_examples(&p, &Fields::default()).unwrap().len(), 2);
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
