//! The jinja environment Hugging Face renders chat templates in, rebuilt on `minijinja`.
//!
//! Follows `transformers/utils/chat_template_utils.py` (`_compile_jinja_template`): an
//! environment with `trim_blocks` and `lstrip_blocks`, loop controls (`break` / `continue`), no
//! auto-escaping, the globals `raise_exception(msg)` and `strftime_now(fmt)`, and a `tojson`
//! filter that is Python's `json.dumps` (not jinja's HTML-escaping one: templates put its output
//! straight into prompts). Python string and dict methods (`.strip()`, `.split()`, `.items()`,
//! ...) come from `minijinja-contrib`'s `pycompat` callback; `namespace`, `dict` and the usual
//! filters are minijinja builtins.

use std::fmt::Write as _;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Value};

/// Name the single template is registered under inside its environment.
pub(super) const TEMPLATE_NAME: &str = "chat_template";

/// An environment holding `source` compiled as [`TEMPLATE_NAME`]; fails on a syntax error.
pub(super) fn compile(source: &str) -> Result<Environment<'static>, Error> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    // jinja2's default, spelled out: one trailing newline of the template is dropped.
    env.set_keep_trailing_newline(false);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env.add_template_owned(TEMPLATE_NAME, source.to_owned())?;
    Ok(env)
}

/// `raise_exception(message)`: templates call it to reject a conversation (bad role order,
/// unsupported role); the message is the error's whole detail.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the local time in Python `strftime` notation (Llama 3.1 puts today's
/// date into its system header).
fn strftime_now(format: String) -> Result<Value, Error> {
    use chrono::format::{Item, StrftimeItems};
    if StrftimeItems::new(&format).any(|item| matches!(item, Item::Error)) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: unsupported format {format:?}"),
        ));
    }
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: cannot format the time with {format:?}"),
        )
    })?;
    Ok(Value::from(out))
}

/// `tojson(ensure_ascii=False, indent=None, separators=None, sort_keys=False)`, as Hugging Face
/// defines it: `json.dumps` with those arguments.
fn tojson(value: &Value, ensure_ascii: Option<bool>, kwargs: Kwargs) -> Result<Value, Error> {
    let ensure_ascii = match kwargs.get::<Option<bool>>("ensure_ascii")? {
        Some(flag) => flag,
        None => ensure_ascii.unwrap_or(false),
    };
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_i64() {
            Some(n) => " ".repeat(usize::try_from(n).unwrap_or(0)),
            None => v
                .as_str()
                .ok_or_else(|| invalid("tojson: indent must be an integer or a string"))?
                .to_owned(),
        }),
    };
    let (item_sep, key_sep) = match kwargs.get::<Option<Vec<String>>>("separators")? {
        Some(pair) if pair.len() == 2 => (pair[0].clone(), pair[1].clone()),
        Some(_) => return Err(invalid("tojson: separators must be a pair of strings")),
        // json.dumps: (', ', ': ') without indent, (',', ': ') with it.
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let style = PyJson {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    let mut out = String::new();
    style.write_value(&mut out, value, 0)?;
    Ok(Value::from(out))
}

fn invalid(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidOperation, message.into())
}

/// The output options of Python's `json.dumps`.
struct PyJson {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl PyJson {
    fn write_value(&self, out: &mut String, value: &Value, depth: usize) -> Result<(), Error> {
        match value.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number if value.is_integer() => out.push_str(&value.to_string()),
            ValueKind::Number => {
                let x = f64::try_from(value.clone())?;
                out.push_str(&py_float_repr(x));
            }
            ValueKind::String => self.write_str(out, value.as_str().unwrap_or_default()),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.write_container(out, '[', ']', &items, depth, |out, item| {
                    self.write_value(out, item, depth + 1)
                })?;
            }
            ValueKind::Map => {
                let mut entries: Vec<(String, Value)> = Vec::new();
                for key in value.try_iter()? {
                    let item = value.get_item(&key)?;
                    entries.push((self.key_string(&key)?, item));
                }
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.write_container(out, '{', '}', &entries, depth, |out, (key, item)| {
                    self.write_str(out, key);
                    out.push_str(&self.key_sep);
                    self.write_value(out, item, depth + 1)
                })?;
            }
            other => {
                return Err(invalid(format!(
                    "tojson: object of kind {other} is not JSON serializable"
                )))
            }
        }
        Ok(())
    }

    /// `[a, b]` or, with an indent, one item per line indented one level deeper than the bracket.
    fn write_container<T>(
        &self,
        out: &mut String,
        open: char,
        close: char,
        items: &[T],
        depth: usize,
        mut write_item: impl FnMut(&mut String, &T) -> Result<(), Error>,
    ) -> Result<(), Error> {
        out.push(open);
        if items.is_empty() {
            out.push(close);
            return Ok(());
        }
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            self.newline(out, depth + 1);
            write_item(out, item)?;
        }
        self.newline(out, depth);
        out.push(close);
        Ok(())
    }

    fn newline(&self, out: &mut String, depth: usize) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(indent);
            }
        }
    }

    /// Python turns non-string keys into strings: `1` -> `"1"`, `True` -> `"true"`, `None` -> `"null"`.
    fn key_string(&self, key: &Value) -> Result<String, Error> {
        match key.kind() {
            ValueKind::String => Ok(key.as_str().unwrap_or_default().to_owned()),
            ValueKind::Number | ValueKind::Bool | ValueKind::None => {
                let mut s = String::new();
                self.write_value(&mut s, key, 0)?;
                Ok(s)
            }
            other => Err(invalid(format!(
                "tojson: keys must be str, int, float, bool or None, not {other}"
            ))),
        }
    }

    /// A JSON string as `json.dumps` escapes it: `"` `\` and control characters always,
    /// everything outside printable ASCII too (as UTF-16 `\uXXXX`) when `ensure_ascii`.
    fn write_str(&self, out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !(' '..='~').contains(&c)) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's `repr(float)`: the shortest digits that round-trip, positional for exponents in
/// [-4, 16), else `d.ddde+XX`; integral values keep `.0`; `NaN` / `Infinity` as `json.dumps`
/// writes them.
fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".to_owned();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.to_owned();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.to_owned();
    }
    // Rust's `{:e}` is the shortest round-trip form too: "-1.2345e-7", "1e16".
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').expect("`{:e}` always has an exponent");
    let exp: i32 = exp.parse().expect("`{:e}` exponent is an integer");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        if point <= 0 {
            format!(
                "{sign}0.{}{digits}",
                "0".repeat(point.unsigned_abs() as usize)
            )
        } else if point as usize >= digits.len() {
            let zeros = "0".repeat(point as usize - digits.len());
            format!("{sign}{digits}{zeros}.0")
        } else {
            let (int, frac) = digits.split_at(point as usize);
            format!("{sign}{int}.{frac}")
        }
    } else {
        let exp_sign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{exp_sign}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use minijinja::context;

    fn render(source: &str, ctx: Value) -> Result<String, Error> {
        compile(source)?.get_template(TEMPLATE_NAME)?.render(ctx)
    }

    #[test]
    fn float_repr_matches_python() {
        // Expected strings are Python 3 `repr(x)`.
        let cases = [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e16, "1e+16"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (123456789012345.6, "123456789012345.6"),
            (1e22, "1e+22"),
            (-0.0, "-0.0"),
            (f64::NAN, "NaN"),
        ];
        for (x, want) in cases {
            assert_eq!(py_float_repr(x), want, "repr({x})");
        }
    }

    #[test]
    fn tojson_is_python_json_dumps() {
        // Built in this order (serde_json's own maps would sort the keys).
        let data: Value = vec![
            ("name", Value::from("café <b>")),
            ("n", Value::from(3)),
            ("x", Value::from(0.5)),
            ("ok", Value::from(true)),
            ("none", Value::from(())),
            (
                "list",
                Value::from(vec![Value::from(1), Value::from("a\n")]),
            ),
            ("empty", Value::from_serialize(serde_json::json!({}))),
        ]
        .into_iter()
        .collect();
        // json.dumps(data, ensure_ascii=False), keys in insertion order, no HTML escaping.
        let got = render("{{ data | tojson }}", context! { data => data.clone() }).unwrap();
        assert_eq!(
            got,
            r#"{"name": "café <b>", "n": 3, "x": 0.5, "ok": true, "none": null, "list": [1, "a\n"], "empty": {}}"#
        );
        let got = render(
            "{{ data | tojson(indent=2, sort_keys=true, ensure_ascii=true) }}",
            context! { data => Value::from_serialize(serde_json::json!({"b": ["é", []], "a": 1})) },
        )
        .unwrap();
        assert_eq!(
            got,
            "{\n  \"a\": 1,\n  \"b\": [\n    \"\\u00e9\",\n    []\n  ]\n}"
        );
        let got = render("{{ '🙂' | tojson(ensure_ascii=true) }}", context! {}).unwrap();
        assert_eq!(got, r#""\ud83d\ude42""#);
    }

    #[test]
    fn trims_blocks_and_strips_their_indent_like_hf() {
        // jinja2 with trim_blocks + lstrip_blocks renders "a\nb\n"; without them it would keep
        // the indentation and the newlines after each tag.
        let source = "{% for x in xs %}\n    {% if x %}\n{{ x }}\n    {% endif %}\n{% endfor %}\n";
        let got = render(source, context! { xs => vec!["a", "", "b"] }).unwrap();
        assert_eq!(got, "a\nb\n");
    }

    #[test]
    fn python_methods_and_loop_controls_work() {
        let source =
            "{% for w in s.strip().split() %}{% if w.startswith('x') %}{% break %}{% endif %}\
                      {{ w.upper() }},{% endfor %}";
        let got = render(source, context! { s => "  ab cd xy ef " }).unwrap();
        assert_eq!(got, "AB,CD,");
    }

    #[test]
    fn raise_exception_fails_with_its_message() {
        let err = render("{{ raise_exception('roles must alternate') }}", context! {}).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidOperation);
        assert_eq!(err.detail(), Some("roles must alternate"));
    }

    #[test]
    fn strftime_now_formats_today() {
        let before = chrono::Local::now().format("%Y-%m-%d").to_string();
        let got = render("{{ strftime_now('%Y-%m-%d') }}", context! {}).unwrap();
        let after = chrono::Local::now().format("%Y-%m-%d").to_string();
        assert!(
            got == before || got == after,
            "{got} is neither {before} nor {after}"
        );
        assert!(render("{{ strftime_now('%Q') }}", context! {}).is_err());
    }
}
