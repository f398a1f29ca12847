//! distill-data: reading text data sets, JSONL (one object per line) and
//! CSV (header row, RFC 4180 quoting), for the coordinator (which plans
//! shards from the number of examples) and the worker (which reads them),
//! so both count the same examples in the same order.
//!
//! Errors name the file and line: non-UTF-8 bytes, malformed JSON, a
//! missing or non-string text field, a CSV row with the wrong number of
//! fields or a stray quote, an empty file. With [`BadExample::Skip`] a bad
//! line (a bad CSV row) is skipped and recorded instead. A CSV quote that
//! never closes is an error under either policy: it would make the rest of
//! the file one field.
//!
//! CSV is parsed by the `csv` crate, held to strict RFC 4180 quoting: a
//! field is bare (no quote in it) or wholly quoted, with its quotes doubled.
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
/// missing field, or a CSV row with invalid UTF-8, a stray quote or the
/// wrong number of fields, is skipped and listed in [`Read::skipped`]
/// (never silently dropped). A CSV quote that never closes, and a file
/// with no examples left, are errors either way.
pub fn read_with(path: &Path, fields: &Fields, policy: BadExample) -> Result<Read> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut skipped = Vec::new();
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
        read_csv(path, bytes, fields, &mut bad)?
    } else {
        read_jsonl(path, &bytes, fields, &mut bad)?
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

fn read_jsonl(path: &Path, bytes: &[u8], fields: &Fields, bad: OnBad) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    // Line by line, so a skip drops only the bad lines.
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let n = i + 1;
        let Ok(line) = std::str::from_utf8(raw) else {
            bad(n, err(path, n, "not valid UTF-8"))?;
            continue;
        };
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

/// Appended (after a line break) to a CSV file's bytes before parsing, to
/// learn from the parser itself whether the file ends inside a quoted
/// field: after a last row that is closed it is a row of its own, one
/// field of exactly these bytes; after a quote that never closes it is
/// read as the end of that open field instead. It holds no quote, comma or
/// line break.
const CSV_END: &[u8] = b"\0distill: end of file\0";

/// A CSV row: the 1-based line it starts on, and its fields, or why they
/// are bad.
struct CsvRow {
    line: usize,
    fields: std::result::Result<Vec<String>, String>,
}

/// 1-based line numbers of byte offsets, asked in increasing order.
struct Lines<'a> {
    bytes: &'a [u8],
    offset: usize,
    line: usize,
}

impl Lines<'_> {
    fn at(&mut self, offset: usize) -> usize {
        let newlines = self.bytes[self.offset..offset]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        self.offset = offset;
        self.line += newlines;
        self.line
    }
}

/// The rows of a CSV file, header first, parsed by the `csv` crate. A
/// quote that never closes is an error here, whatever the policy: the
/// parser would end the open field at the end of the file and return the
/// rest of the file as its text, one row where there were many.
fn csv_rows(path: &Path, mut data: Vec<u8>) -> Result<Vec<CsvRow>> {
    let len = data.len();
    data.push(b'\n');
    data.extend_from_slice(CSV_END);
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(&data[..]);
    // Each record with the offset its parse began at: just after the
    // previous record, so blank lines and a CRLF's LF may come first.
    let mut records = Vec::new();
    for record in rdr.byte_records() {
        let record = record.map_err(|e| Error::Data {
            path: path.to_path_buf(),
            message: format!("invalid CSV: {e}"),
        })?;
        let start = record.position().map_or(0, |p| p.byte() as usize);
        records.push((start, record));
    }
    let first_byte = |start: usize| {
        start
            + data[start..]
                .iter()
                .take_while(|&&b| matches!(b, b'\r' | b'\n'))
                .count()
    };
    let mut lines = Lines {
        bytes: &data,
        offset: 0,
        line: 1,
    };
    let end = match records.pop() {
        Some((start, r)) if r.len() == 1 && &r[0] == CSV_END => start,
        Some((start, r)) => {
            let first = first_byte(start);
            let line = lines.at(first);
            // The open field is the last; its text is the file's bytes
            // after the quote (with its doubled quotes single), then ours.
            let open = r.iter().next_back().unwrap_or_default();
            let text = &open[..open.len().saturating_sub(CSV_END.len() + 1)];
            let raw = text.len() + text.iter().filter(|&&b| b == b'"').count();
            let quote = match len.checked_sub(raw + 1) {
                Some(q) if q >= first && data[q] == b'"' => lines.at(q),
                _ => line,
            };
            let last = lines.at(len.saturating_sub(1).max(lines.offset));
            let reason = if last > quote {
                format!(
                    "unterminated quote: the quote opened on line {quote} never closes, \
                     so lines {quote}-{last} would be read as one field"
                )
            } else {
                format!("unterminated quote: the quote opened on line {quote} never closes")
            };
            return Err(err(path, line, reason));
        }
        None => return Ok(vec![]),
    };
    let ends = records.iter().skip(1).map(|(s, _)| *s).chain([end]);
    let rows = records.iter().zip(ends).map(|((start, record), end)| {
        let first = first_byte(*start);
        let fields = strict_quoting(&data[first..end], record).and_then(|()| {
            record
                .iter()
                .map(|f| String::from_utf8(f.to_vec()).map_err(|_| "not valid UTF-8".into()))
                .collect()
        });
        CsvRow {
            line: lines.at(first),
            fields,
        }
    });
    Ok(rows.collect())
}

/// Checks that `raw`, the bytes a record was parsed from (from its first
/// byte to the next record), are strict RFC 4180 for the fields the `csv`
/// crate read from them: each field bare with no quote in it, or quoted
/// whole with its quotes doubled; commas between; then only the line
/// break. The crate takes a quote inside a bare field (`ab"c`) and text
/// after a closing quote (`"ab"c`) as text, so a stray quote could join
/// rows into one that still has the right number of fields. Both are
/// refused here, so every quote of a file that reads belongs to a quoted
/// field.
fn strict_quoting(raw: &[u8], record: &csv::ByteRecord) -> std::result::Result<(), String> {
    let mut rest = raw;
    for (i, field) in record.iter().enumerate() {
        let column = i + 1;
        if i > 0 {
            rest = rest
                .strip_prefix(b",")
                .ok_or_else(|| format!("column {column}: not found in the row"))?;
        }
        if rest.first() == Some(&b'"') {
            let mut quoted = Vec::with_capacity(field.len() + 2);
            quoted.push(b'"');
            for &b in field {
                if b == b'"' {
                    quoted.push(b'"');
                }
                quoted.push(b);
            }
            quoted.push(b'"');
            rest = rest
                .strip_prefix(&quoted[..])
                .ok_or_else(|| format!("column {column}: text after a closing quote"))?;
        } else if field.contains(&b'"') {
            return Err(format!(
                "column {column}: quote in a field that is not quoted"
            ));
        } else {
            rest = rest
                .strip_prefix(field)
                .ok_or_else(|| format!("column {column}: not found in the row"))?;
        }
    }
    if rest.iter().all(|&b| matches!(b, b'\r' | b'\n')) {
        Ok(())
    } else {
        Err("text after the last field".into())
    }
}

fn read_csv(path: &Path, bytes: Vec<u8>, fields: &Fields, bad: OnBad) -> Result<Vec<Example>> {
    let mut rows = csv_rows(path, bytes)?.into_iter();
    let Some(header) = rows.next() else {
        return Ok(vec![]);
    };
    let header_line = header.line;
    let header = header
        .fields
        .map_err(|e| err(path, header_line, format!("header: {e}")))?;
    let col = |f: &str| header.iter().position(|h| h.trim() == f);
    let text_col = col(&fields.text).ok_or_else(|| {
        err(
            path,
            header_line,
            format!("no column named {}", fields.text),
        )
    })?;
    let pair_col = match &fields.text_pair {
        Some(f) => {
            Some(col(f).ok_or_else(|| err(path, header_line, format!("no column named {f}")))?)
        }
        None => None,
    };
    let label_col = fields.label.as_deref().and_then(col);
    let mut out = Vec::new();
    for CsvRow { line, fields } in rows {
        let row = match fields {
            Ok(row) => row,
            Err(e) => {
                bad(line, err(path, line, e))?;
                continue;
            }
        };
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

    /// The file of issue 40: a header and 60 rows (lines 2-61), the text
    /// of the row on line 23 opening a quote that never closes.
    fn unterminated_quote_csv() -> Vec<u8> {
        let mut csv = String::from("label,text\n");
        for i in 2..=61 {
            if i == 23 {
                csv.push_str(&format!("pos,\"row {i} opens a quote\n"));
            } else {
                csv.push_str(&format!("neg,row {i}\n"));
            }
        }
        csv.into_bytes()
    }

    #[test]
    fn csv_unterminated_quote_fails_naming_file_and_line() {
        let (_d, p) = write("open.csv", &unterminated_quote_csv());
        // Never one example that swallows 38 rows, nor a skip.
        for policy in [BadExample::Fail, BadExample::Skip] {
            let e = read_with(&p, &Fields::default(), policy)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("open.csv")
                    && e.contains("line 23: unterminated quote")
                    && e.contains("lines 23-61"),
                "{policy:?}: {e}"
            );
        }
        // Open in the first column, so the row also has too few fields:
        // still the unterminated quote, under either policy.
        let (_d, p) = write("first.csv", b"text,label\na,pos\n\"b,neg\nc,neg\n");
        for policy in [BadExample::Fail, BadExample::Skip] {
            let e = read_with(&p, &Fields::default(), policy)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("first.csv: line 3: unterminated quote") && e.contains("lines 3-4"),
                "{policy:?}: {e}"
            );
        }
        // A row over lines 2-3 whose second line opens the quote; no
        // line break at the end; CRLF; the header itself.
        let (_d, p) = write("later.csv", b"text,label\r\n\"a\r\nb\",\"pos\r\nc,neg");
        let e = read_examples(&p, &Fields::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("later.csv: line 2: unterminated quote: the quote opened on line 3")
                && e.contains("lines 3-4"),
            "{e}"
        );
        let (_d, p) = write("header.csv", b"text,\"label\n");
        let e = read_examples(&p, &Fields::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 1: unterminated quote: the quote opened on line 1 never closes"),
            "{e}"
        );
    }

    #[test]
    fn csv_wrong_field_count_fails_with_line() {
        let (_d, p) = write("count.csv", b"text,label\na,pos\n\"b\nb\"\nc,neg\n");
        let e = read_examples(&p, &Fields::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("count.csv: line 3: expected 2 columns, found 1"),
            "{e}"
        );
        let (_d, p) = write("extra.csv", b"text,label\na,pos\nb,neg,\n");
        let e = read_examples(&p, &Fields::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("extra.csv: line 3: expected 2 columns, found 3"),
            "{e}"
        );
    }

    #[test]
    fn csv_bad_utf8_fails_with_line() {
        let (_d, p) = write("bin.csv", b"text,label\na,pos\n\"b\nb\",neg\nc\xff,neg\n");
        let e = read_examples(&p, &Fields::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("bin.csv: line 5: not valid UTF-8"), "{e}");
        let (_d, p) = write("head.csv", b"te\xc3xt,label\na,pos\n");
        let e = read_examples(&p, &Fields::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1: header: not valid UTF-8"), "{e}");
    }

    #[test]
    fn csv_stray_quotes_fail_with_line() {
        for (bytes, reason) in [
            (
                &b"text,label\na,pos\nsay \"hi\",neg\n"[..],
                "line 3: column 1: quote in a field that is not quoted",
            ),
            (
                b"text,label\na,pos\n\"say\" hi,neg\n",
                "line 3: column 1: text after a closing quote",
            ),
            (
                b"text,label\na,pos\nb,\"neg\"\"\" \n",
                "line 3: column 2: text after a closing quote",
            ),
        ] {
            let (_d, p) = write("stray.csv", bytes);
            let e = read_examples(&p, &Fields::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains("stray.csv") && e.contains(reason), "{e}");
        }
        // What the lenient reading would do: the quote before `x` closes
        // at `",b"`, and two rows become one with the right field count.
        let (_d, p) = write("join.csv", b"text,label\n\"x,1\na,\",b\"\n");
        let e = read_examples(&p, &Fields::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2: column 2: quote in a field"), "{e}");
    }

    #[test]
    fn csv_skip_policy_lists_bad_rows() {
        let (_d, p) = write(
            "skip.csv",
            b"text,label\r\nok,pos\r\n\"two\r\nlines\",neg\r\nshort\r\n\r\nb\xff,neg\r\nsay \"hi\",pos\r\nc,neg,x\r\nfine,\r\n",
        );
        let r = read_with(&p, &Fields::default(), BadExample::Skip).unwrap();
        let got: Vec<_> = r
            .examples
            .iter()
            .map(|e| (e.line, e.text.as_str(), e.label.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                (2, "ok", Some("pos")),
                (3, "two\r\nlines", Some("neg")),
                (10, "fine", None)
            ]
        );
        let why: Vec<_> = r
            .skipped
            .iter()
            .map(|s| (s.line, s.reason.as_str()))
            .collect();
        assert_eq!(
            why,
            [
                (5, "expected 2 columns, found 1"),
                (7, "not valid UTF-8"),
                (8, "column 1: quote in a field that is not quoted"),
                (9, "expected 2 columns, found 3"),
            ]
        );
        assert!(r.skipped[1]
            .to_string()
            .contains("skip.csv: line 7: not valid UTF-8"));
        let e = read_with(&p, &Fields::default(), BadExample::Fail)
            .unwrap_err()
            .to_string();
        assert!(e.contains("skip.csv: line 5: expected 2 columns"), "{e}");
    }

    #[test]
    fn csv_header_names_the_fields() {
        let fields = Fields {
            text: "a".into(),
            text_pair: Some("b".into()),
            label: Some("y".into()),
        };
        let (_d, p) = write("pair.csv", b"\n\ny, b ,a\n1,second,first\n");
        let ex = read_examples(&p, &fields).unwrap();
        assert_eq!(
            ex,
            [Example {
                text: "first".into(),
                text_pair: Some("second".into()),
                label: Some("1".into()),
                line: 4,
            }]
        );
        let e = read_examples(&p, &Fields::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3: no column named text"), "{e}");
        let (_d, p) = write("none.csv", b"text,label\n\n");
        assert!(read_examples(&p, &Fields::default())
            .unwrap_err()
            .to_string()
            .contains("no examples"));
        let (_d, p) = write("empty.csv", b"");
        assert!(read_examples(&p, &Fields::default())
            .unwrap_err()
            .to_string()
            .contains("no examples"));
    }

    mod csv_properties {
        use super::*;
        use proptest::prelude::*;

        /// A field's text: commas, quotes, line breaks and non-ASCII often.
        fn cell() -> impl Strategy<Value = String> {
            prop_oneof![
                "[a-z ,\"\r\n]{0,12}",
                "[ -~\t\r\n\u{e9}\u{4e2d}\u{1f980}\u{2028}\u{feff}]{0,10}",
                any::<String>(),
            ]
        }

        /// Random rows written by the `csv` crate's writer under a
        /// `text,label` header, in either order, with LF or CRLF line
        /// breaks and minimal or full quoting: the file, and the examples
        /// that must come back (the line of each is where the writer
        /// started it).
        fn written() -> impl Strategy<Value = (Vec<u8>, Vec<Example>)> {
            (
                prop::collection::vec((cell(), cell()), 1..24),
                any::<bool>(),
                any::<bool>(),
                any::<bool>(),
            )
                .prop_map(|(rows, label_first, crlf, always)| {
                    let mut w = csv::WriterBuilder::new()
                        .terminator(if crlf {
                            csv::Terminator::CRLF
                        } else {
                            csv::Terminator::Any(b'\n')
                        })
                        .quote_style(if always {
                            csv::QuoteStyle::Always
                        } else {
                            csv::QuoteStyle::Necessary
                        })
                        .from_writer(Vec::new());
                    let order = |text: &str, label: &str| {
                        if label_first {
                            [label.to_string(), text.to_string()]
                        } else {
                            [text.to_string(), label.to_string()]
                        }
                    };
                    w.write_record(order("text", "label")).unwrap();
                    let mut examples = Vec::new();
                    for (text, label) in rows {
                        w.flush().unwrap();
                        let newlines = w.get_ref().iter().filter(|&&b| b == b'\n').count();
                        w.write_record(order(&text, &label)).unwrap();
                        examples.push(Example {
                            text,
                            text_pair: None,
                            label: Some(label).filter(|l| !l.is_empty()),
                            line: newlines + 1,
                        });
                    }
                    (w.into_inner().unwrap(), examples)
                })
        }

        proptest! {
            // No regressions file: the failing case is printed instead.
            #![proptest_config(ProptestConfig {
                failure_persistence: None,
                ..ProptestConfig::default()
            })]

            #[test]
            fn csv_reads_back_exactly_the_rows_written((bytes, want) in written()) {
                let (_d, p) = write("rows.csv", &bytes);
                let r = read_with(&p, &Fields::default(), BadExample::Skip).unwrap();
                prop_assert!(r.skipped.is_empty(), "{:?}", r.skipped);
                prop_assert_eq!(&r.examples, &want);
                prop_assert_eq!(read_examples(&p, &Fields::default()).unwrap(), want);
            }

            #[test]
            fn csv_with_a_stray_quote_fails_or_reads_exactly_the_rows(
                (bytes, want) in written(),
                at in any::<prop::sample::Index>(),
            ) {
                let text = String::from_utf8(bytes).unwrap();
                let at = *at.get(
                    &text
                        .char_indices()
                        .map(|(i, _)| i)
                        .chain([text.len()])
                        .collect::<Vec<_>>(),
                );
                let mut bytes = text.into_bytes();
                bytes.insert(at, b'"');
                let (_d, p) = write("rows.csv", &bytes);
                let read = read_examples(&p, &Fields::default());
                if let Ok(got) = &read {
                    let texts = |ex: &[Example]| -> Vec<(String, Option<String>)> {
                        ex.iter().map(|e| (e.text.clone(), e.label.clone())).collect()
                    };
                    prop_assert_eq!(texts(got), texts(&want), "read without an error");
                }
                // Stronger, from strict quoting: a file that reads has an
                // even number of quotes, and one quote more makes it odd.
                prop_assert!(read.is_err(), "{:?}", read);
                // Under the skip policy: an error, or the skipped rows
                // listed, never a different set of rows in silence.
                match read_with(&p, &Fields::default(), BadExample::Skip) {
                    Err(_) => {}
                    Ok(r) => prop_assert!(!r.skipped.is_empty(), "{:?}", r.examples),
                }
            }
        }
    }
}
