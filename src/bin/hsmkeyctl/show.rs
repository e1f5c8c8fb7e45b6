//! Output: aligned tables for people, one JSON document for scripts (`--json`). hsmkeyctl
//! never colours its output.

use std::io::IsTerminal;

use comfy_table::presets::{NOTHING, UTF8_HORIZONTAL_ONLY};
use comfy_table::{ContentArrangement, Table};
use serde_json::Value;

/// A table in the style of the output: lines on a terminal, bare aligned columns otherwise.
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    let tty = std::io::stdout().is_terminal();
    // Wrap to the terminal's width only when it has a real one (a pseudo-terminal may
    // report 0 columns).
    let wide = tty && t.width().is_some_and(|w| w >= 40);
    let _ = t
        .load_preset(if tty { UTF8_HORIZONTAL_ONLY } else { NOTHING })
        .set_content_arrangement(if wide {
            ContentArrangement::Dynamic
        } else {
            ContentArrangement::Disabled
        })
        .set_header(header.iter().copied());
    t
}

/// A JSON value as a table cell: strings bare, null as `-`, arrays joined by commas.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.is_empty() => "-".into(),
        Value::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// The keys of a listing.
pub fn keys(keys: &[Value]) -> String {
    let mut t = table(&[
        "KID", "LABEL", "TYPE", "SIZE", "CLASS", "ROLES", "USAGE", "VALIDITY", "STATE", "UPDATED",
    ]);
    for k in keys {
        let size = match (&k["bits"], &k["curve"]) {
            (Value::Number(b), _) => format!("{b} bits"),
            (_, Value::String(c)) => c.clone(),
            _ => "-".into(),
        };
        let _ = t.add_row(vec![
            cell(&k["kid"]),
            cell(&k["label"]),
            cell(&k["type"]),
            size,
            cell(&k["class"]),
            cell(&k["roles"]),
            usage(&k["attributes"]),
            validity(k),
            cell(&k["state"]),
            cell(&k["updated_at"]),
        ]);
    }
    t.to_string()
}

/// The usage flags a key's `attributes` has on, comma-separated (`-` for none).
pub fn usage(attributes: &Value) -> String {
    const FLAGS: [&str; 7] = [
        "sign", "verify", "encrypt", "decrypt", "wrap", "unwrap", "derive",
    ];
    let on: Vec<&str> = FLAGS
        .into_iter()
        .filter(|f| attributes[f] == Value::Bool(true))
        .collect();
    if on.is_empty() {
        "-".into()
    } else {
        on.join(",")
    }
}

/// A key's validity, `not_before..not_after` (`-` for no date at all).
pub fn validity(key: &Value) -> String {
    match (&key["not_before"], &key["not_after"]) {
        (Value::Null, Value::Null) => "-".into(),
        (from, to) => format!("{}..{}", cell(from), cell(to)),
    }
}

/// One object as two columns: field and value (nested objects flattened with dots).
pub fn fields(v: &Value) -> String {
    let mut t = table(&["FIELD", "VALUE"]);
    let mut rows = Vec::new();
    flatten("", v, &mut rows);
    for (k, v) in rows {
        let _ = t.add_row(vec![k, v]);
    }
    t.to_string()
}

fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                let name = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&name, v, out);
            }
        }
        other => out.push((prefix.to_string(), cell(other))),
    }
}

/// Prints a document as JSON (pretty, one document).
pub fn json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}
