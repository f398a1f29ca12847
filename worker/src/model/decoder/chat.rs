//! Chat templates: `tokenizer_config.json`'s `chat_template` (Jinja, as
//! transformers renders it) applied to a list of `messages`, with
//! `minijinja` (Python-style string methods such as `.strip()` through
//! `minijinja-contrib`'s pycompat). Variables: `messages`,
//! `add_generation_prompt`, `bos_token`, `eos_token`, and
//! `raise_exception(msg)`, which fails the render with the template's own
//! message.

use crate::{Error, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

pub struct ChatTemplate {
    source: String,
    bos: String,
    eos: String,
    origin: PathBuf,
}

fn token_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        // transformers' AddedToken form: {"content": "..."}.
        Some(Value::Object(o)) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or("")
            .to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// The template in `<dir>/tokenizer_config.json` (or a
    /// `chat_template.jinja` beside it, transformers 5's spelling), if any.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("tokenizer_config.json");
        let cfg: Value = if path.exists() {
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            serde_json::from_str(&text).map_err(|e| Error::Tokenizer {
                path: path.clone(),
                message: format!("invalid json: {e}"),
            })?
        } else {
            Value::Null
        };
        let jinja = dir.join("chat_template.jinja");
        let (source, origin) = match cfg.get("chat_template") {
            Some(Value::String(s)) => (s.clone(), path.clone()),
            Some(Value::Array(list)) => {
                // Named templates: the "default" one.
                let t = list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .ok_or_else(|| Error::Tokenizer {
                        path: path.clone(),
                        message: "field chat_template: a list without a 'default' template".into(),
                    })?;
                (t.to_string(), path.clone())
            }
            _ if jinja.exists() => (
                std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?,
                jinja.clone(),
            ),
            _ => return Ok(None),
        };
        let t = ChatTemplate {
            source,
            bos: token_text(cfg.get("bos_token")),
            eos: token_text(cfg.get("eos_token")),
            origin,
        };
        // Fail on a template that does not parse now, not at the first prompt.
        t.env()?;
        Ok(Some(t))
    }

    fn env(&self) -> Result<minijinja::Environment<'_>> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", &self.source)
            .map_err(|e| Error::Tokenizer {
                path: self.origin.clone(),
                message: format!("field chat_template: {e}"),
            })?;
        Ok(env)
    }

    /// The prompt text for `messages` (a JSON list of {role, content}).
    pub fn render(&self, messages: &Value, add_generation_prompt: bool) -> Result<String> {
        let env = self.env()?;
        let t = env.get_template("chat").unwrap();
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| Error::Invalid(format!("chat template of {}: {e}", self.origin.display())))
    }
}
