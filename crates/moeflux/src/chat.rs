//! Chat templates: the model's own Jinja template, rendered with minijinja
//! the way Hugging Face's `apply_chat_template` renders it.
//!
//! Compatibility points with transformers (which uses Python jinja2):
//! - `trim_blocks` and `lstrip_blocks` are on, as transformers sets them;
//! - Python string/dict methods (`startswith`, `split`, `items`, ...) come
//!   from minijinja-contrib's pycompat layer;
//! - `tojson` is Python's `json.dumps`: `", "` and `": "` separators, no
//!   HTML escaping, non-ASCII kept, key order preserved (minijinja's own
//!   filter escapes `<>&'` and would change the prompt);
//! - `raise_exception(msg)` fails the render with the template's message,
//!   and `strftime_now(fmt)` gives the current UTC date.

use std::path::Path;

use minijinja::value::{Kwargs, Value as JValue};
use minijinja::{Environment, Error as JError, ErrorKind};
use serde_json::Value;

use crate::format::gguf::Metadata;

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("the model has no chat template; use --raw to send the prompt as is")]
    NoTemplate,
    #[error("the chat template does not compile: {0}")]
    Compile(String),
    #[error("the chat template failed: {0}")]
    Render(String),
}

/// A compiled chat template and the special-token strings it may use.
pub struct ChatTemplate {
    env: Environment<'static>,
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("len", &self.source.len())
            .finish()
    }
}

/// Python's `json.dumps(value)` with `ensure_ascii=False`: the formatting
/// templates expect inside prompts.
pub fn python_json(v: &Value, indent: Option<usize>) -> String {
    fn write(out: &mut String, v: &Value, indent: Option<usize>, depth: usize) {
        let newline = |out: &mut String, depth: usize| {
            if let Some(n) = indent {
                out.push('\n');
                out.push_str(&" ".repeat(n * depth));
            }
        };
        let item_sep = if indent.is_some() { "," } else { ", " };
        match v {
            Value::Array(a) if a.is_empty() => out.push_str("[]"),
            Value::Object(o) if o.is_empty() => out.push_str("{}"),
            Value::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push_str(item_sep);
                    }
                    newline(out, depth + 1);
                    write(out, x, indent, depth + 1);
                }
                newline(out, depth);
                out.push(']');
            }
            Value::Object(o) => {
                out.push('{');
                for (i, (k, x)) in o.iter().enumerate() {
                    if i > 0 {
                        out.push_str(item_sep);
                    }
                    newline(out, depth + 1);
                    out.push_str(&serde_json::to_string(k).unwrap_or_default());
                    out.push_str(": ");
                    write(out, x, indent, depth + 1);
                }
                newline(out, depth);
                out.push('}');
            }
            Value::Number(n) if n.is_f64() => {
                // Python prints whole floats with a trailing ".0".
                let f = n.as_f64().unwrap_or(0.0);
                if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e16 {
                    out.push_str(&format!("{f:.1}"));
                } else {
                    out.push_str(&n.to_string());
                }
            }
            other => out.push_str(&serde_json::to_string(other).unwrap_or_default()),
        }
    }
    let mut out = String::new();
    write(&mut out, v, indent, 0);
    out
}

fn tojson(value: JValue, kwargs: Kwargs) -> Result<String, JError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    // ensure_ascii / sort_keys / separators are accepted and, where they
    // would change the output from the defaults, refused by name.
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let _ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let json: Value = serde_json::to_value(&value)
        .map_err(|e| JError::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    if sort_keys == Some(true) {
        return Err(JError::new(
            ErrorKind::InvalidOperation,
            "tojson(sort_keys=true) is not supported",
        ));
    }
    Ok(python_json(&json, indent))
}

fn raise_exception(msg: String) -> Result<JValue, JError> {
    Err(JError::new(ErrorKind::InvalidOperation, msg))
}

/// `strftime_now(fmt)`: the current UTC date/time, for the directives chat
/// templates use (`%Y %m %d %B %b %H %M %S %y %e %A %a %j %%`).
fn strftime_now(fmt: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(&fmt, secs)
}

/// Formats a Unix time (UTC).
pub fn strftime(fmt: &str, unix: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = unix.div_euclid(86_400);
    let rem = unix.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(m - 1) as usize] + d + i64::from(leap && m > 2);
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:2}")),
            Some('B') => out.push_str(month),
            Some('b') => out.push_str(&month[..3]),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

impl ChatTemplate {
    /// Compiles a template.
    pub fn new(
        source: String,
        bos_token: String,
        eos_token: String,
    ) -> Result<ChatTemplate, ChatError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned("chat", source.clone())
            .map_err(|e| ChatError::Compile(describe(&e)))?;
        Ok(ChatTemplate {
            env,
            source,
            bos_token,
            eos_token,
        })
    }

    /// The template of a GGUF file (`tokenizer.chat_template`), if any.
    pub fn from_gguf(
        meta: &Metadata,
        bos: String,
        eos: String,
    ) -> Option<Result<ChatTemplate, ChatError>> {
        let src = meta.get_str("tokenizer.chat_template")?;
        Some(ChatTemplate::new(src.to_string(), bos, eos))
    }

    /// The template of a checkpoint directory: `chat_template.jinja`, or
    /// `chat_template` in `tokenizer_config.json` (a string, or a list of
    /// named templates of which "default" is used).
    pub fn from_hf_dir(
        dir: &Path,
        bos: String,
        eos: String,
    ) -> Option<Result<ChatTemplate, ChatError>> {
        if let Ok(src) = std::fs::read_to_string(dir.join("chat_template.jinja")) {
            return Some(ChatTemplate::new(src, bos, eos));
        }
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?)
                .ok()?;
        let src = match cfg.get("chat_template")? {
            Value::String(s) => s.clone(),
            Value::Array(list) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str())?
                .to_string(),
            _ => return None,
        };
        Some(ChatTemplate::new(src, bos, eos))
    }

    /// Renders a conversation. `messages` is an array of OpenAI-style
    /// message objects (`role`, `content`, optional `tool_calls`, ...);
    /// `tools` an array of tool definitions; `extra` more variables (e.g.
    /// `enable_thinking`), all passed to the template as they are.
    pub fn render(
        &self,
        messages: &Value,
        tools: Option<&Value>,
        add_generation_prompt: bool,
        extra: Option<&Value>,
    ) -> Result<String, ChatError> {
        let mut ctx = serde_json::Map::new();
        if let Some(Value::Object(e)) = extra {
            ctx.extend(e.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        ctx.insert("messages".into(), messages.clone());
        if let Some(t) = tools {
            ctx.insert("tools".into(), t.clone());
        }
        ctx.insert(
            "add_generation_prompt".into(),
            Value::Bool(add_generation_prompt),
        );
        ctx.insert("bos_token".into(), Value::String(self.bos_token.clone()));
        ctx.insert("eos_token".into(), Value::String(self.eos_token.clone()));
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| ChatError::Render(describe(&e)))?;
        tmpl.render(JValue::from_serialize(Value::Object(ctx)))
            .map_err(|e| ChatError::Render(describe(&e)))
    }
}

/// A minijinja error with its cause chain and the template line, so an
/// unsupported construct is named.
fn describe(e: &JError) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(&format!(": {inner}"));
        src = inner.source();
    }
    if let Some(line) = e.line() {
        s.push_str(&format!(" (template line {line})"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn python_json_formatting() {
        let v = json!({"name": "f", "args": {"x": 1, "y": [1.0, "é<>"], "z": null}});
        assert_eq!(
            python_json(&v, None),
            r#"{"name": "f", "args": {"x": 1, "y": [1.0, "é<>"], "z": null}}"#
        );
        assert_eq!(
            python_json(&json!({"a": [1]}), Some(2)),
            "{\n  \"a\": [\n    1\n  ]\n}"
        );
    }

    #[test]
    fn strftime_known_dates() {
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S", 0), "1970-01-01 00:00:00");
        assert_eq!(
            strftime("%d %b %Y, %A, day %j", 1_709_164_800),
            "29 Feb 2024, Thursday, day 060"
        );
    }

    #[test]
    fn renders_with_python_features() {
        let src = "{%- for m in messages %}{% if m.role.startswith('us') %}<u>{{ m.content | trim }}{% else %}{{ m.content.split(' ')[0] }}{% endif %}{% endfor %}{{ tools[0] | tojson }}{% if add_generation_prompt %}<a>{% endif %}";
        let t = ChatTemplate::new(src.into(), String::new(), String::new()).unwrap();
        let out = t
            .render(
                &json!([{"role": "user", "content": " hi "}, {"role": "assistant", "content": "a b"}]),
                Some(&json!([{"type": "function", "function": {"name": "f"}}])),
                true,
                None,
            )
            .unwrap();
        assert_eq!(
            out,
            r#"<u>hia{"type": "function", "function": {"name": "f"}}<a>"#
        );
    }

    #[test]
    fn raise_exception_and_unknown_constructs_are_reported() {
        let t = ChatTemplate::new(
            "{{ raise_exception('roles must alternate') }}".into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        let e = t.render(&json!([]), None, false, None).unwrap_err();
        assert!(e.to_string().contains("roles must alternate"), "{e}");
        let e =
            ChatTemplate::new("{% frobnicate %}".into(), String::new(), String::new()).unwrap_err();
        assert!(e.to_string().contains("frobnicate"), "{e}");
    }
}
