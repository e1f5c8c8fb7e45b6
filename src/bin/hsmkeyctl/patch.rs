//! The options that change a key (everything PATCH takes but the label) and the one
//! function turning them into a PATCH body, so every command that changes keys
//! (`update`, and any later one that sends the same patch) parses them alike.

use clap::Args;
use serde_json::{json, Map, Value};

use crate::Failure;

/// The usage flags PATCH knows, in the API's spelling.
const USAGE_FLAGS: [&str; 7] = [
    "sign", "verify", "encrypt", "decrypt", "wrap", "unwrap", "derive",
];

/// What to change besides the label.
#[derive(Args, Debug, Default, Clone)]
pub(crate) struct PatchFlags {
    /// New description.
    #[arg(long, conflicts_with = "clear_description")]
    pub(crate) description: Option<String>,
    /// Remove the description.
    #[arg(long)]
    pub(crate) clear_description: bool,
    /// New roles, comma-separated (who may update the key).
    #[arg(long, value_delimiter = ',', conflicts_with = "clear_roles")]
    pub(crate) roles: Option<Vec<String>>,
    /// Remove the roles (any principal with the scope may update).
    #[arg(long)]
    pub(crate) clear_roles: bool,
    /// Usage flags to set, e.g. sign=false,verify=true (sign, verify, encrypt, decrypt,
    /// wrap, unwrap, derive); flags not named stay as they are.
    #[arg(long, value_name = "FLAG=BOOL,...", value_parser = usage_flag, value_delimiter = ',')]
    pub(crate) usage: Option<Vec<(String, bool)>>,
    /// First day the key may be used (YYYY-MM-DD; CKA_START_DATE).
    #[arg(long, value_name = "DATE", value_parser = date, conflicts_with = "clear_not_before")]
    pub(crate) not_before: Option<String>,
    /// Last day the key may be used (YYYY-MM-DD; CKA_END_DATE).
    #[arg(long, value_name = "DATE", value_parser = date, conflicts_with = "clear_not_after")]
    pub(crate) not_after: Option<String>,
    /// Remove the start date.
    #[arg(long)]
    pub(crate) clear_not_before: bool,
    /// Remove the end date.
    #[arg(long)]
    pub(crate) clear_not_after: bool,
    /// Make the key sensitive (CKA_SENSITIVE; this cannot be undone).
    #[arg(long, conflicts_with = "no_sensitive")]
    pub(crate) sensitive: bool,
    /// Ask for CKA_SENSITIVE false: PKCS#11 refuses it on a sensitive key, and so does the
    /// daemon (exit 1, irreversible_attribute).
    #[arg(long)]
    pub(crate) no_sensitive: bool,
    /// Make the key not extractable (CKA_EXTRACTABLE; this cannot be undone).
    #[arg(long, conflicts_with = "extractable")]
    pub(crate) no_extractable: bool,
    /// Ask for CKA_EXTRACTABLE true: PKCS#11 refuses it on a key that is not extractable,
    /// and so does the daemon (exit 1, irreversible_attribute).
    #[arg(long)]
    pub(crate) extractable: bool,
}

/// `flag=bool`, one item of `--usage`.
fn usage_flag(item: &str) -> Result<(String, bool), String> {
    let (name, value) = item
        .split_once('=')
        .ok_or_else(|| format!("{item:?}: give FLAG=true or FLAG=false"))?;
    let name = name.trim();
    if !USAGE_FLAGS.contains(&name) {
        return Err(format!(
            "{name:?} is not a usage flag; use {}",
            USAGE_FLAGS.join(", ")
        ));
    }
    let on = match value.trim() {
        "true" => true,
        "false" => false,
        other => return Err(format!("{name}={other}: give true or false")),
    };
    Ok((name.to_string(), on))
}

/// A calendar date as the API takes it, `YYYY-MM-DD`.
pub(crate) fn date(text: &str) -> Result<String, String> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(text, &format)
        .map(|_| text.to_string())
        .map_err(|_| format!("{text:?} is not a date; give YYYY-MM-DD"))
}

/// The PATCH body the flags ask for (without a label). A flag named twice in `--usage`
/// is a usage error rather than a silent choice.
pub(crate) fn patch_from_flags(f: &PatchFlags) -> Result<Map<String, Value>, Failure> {
    let mut patch = Map::new();
    let mut put = |k: &str, v: Value| {
        let _ = patch.insert(k.into(), v);
    };
    if let Some(d) = &f.description {
        put("description", json!(d));
    }
    if f.clear_description {
        put("description", Value::Null);
    }
    if let Some(r) = &f.roles {
        put("roles", json!(r));
    }
    if f.clear_roles {
        put("roles", Value::Null);
    }
    if let Some(flags) = &f.usage {
        let mut usage = Map::new();
        for (name, on) in flags {
            if usage.insert(name.clone(), json!(on)).is_some() {
                return Err(Failure::Usage(format!("--usage names {name} twice")));
            }
        }
        put("usage", Value::Object(usage));
    }
    for (name, value, clear) in [
        ("not_before", &f.not_before, f.clear_not_before),
        ("not_after", &f.not_after, f.clear_not_after),
    ] {
        if let Some(d) = value {
            put(name, json!(d));
        }
        if clear {
            put(name, Value::Null);
        }
    }
    if f.sensitive || f.no_sensitive {
        put("sensitive", json!(f.sensitive));
    }
    if f.extractable || f.no_extractable {
        put("extractable", json!(f.extractable));
    }
    Ok(patch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_items_parse_and_bad_ones_say_why() {
        assert_eq!(usage_flag("sign=false"), Ok(("sign".into(), false)));
        assert_eq!(usage_flag(" derive = true"), Ok(("derive".into(), true)));
        assert!(usage_flag("sign").unwrap_err().contains("FLAG=true"));
        assert!(usage_flag("sing=true")
            .unwrap_err()
            .contains("not a usage flag"));
        assert!(usage_flag("sign=yes")
            .unwrap_err()
            .contains("true or false"));
    }

    #[test]
    fn dates_must_be_calendar_days() {
        assert_eq!(date("2027-06-30").as_deref(), Ok("2027-06-30"));
        assert!(date("2027-02-30").is_err());
        assert!(date("30.06.2027").is_err());
    }

    #[test]
    fn the_flags_become_one_patch_body() {
        let f = PatchFlags {
            usage: Some(vec![("sign".into(), false), ("verify".into(), true)]),
            not_after: Some("2027-06-30".into()),
            clear_not_before: true,
            sensitive: true,
            no_extractable: true,
            ..PatchFlags::default()
        };
        assert_eq!(
            Value::Object(patch_from_flags(&f).unwrap()),
            json!({"usage": {"sign": false, "verify": true}, "not_after": "2027-06-30",
                   "not_before": null, "sensitive": true, "extractable": false})
        );
        let twice = PatchFlags {
            usage: Some(vec![("sign".into(), false), ("sign".into(), true)]),
            ..PatchFlags::default()
        };
        assert!(patch_from_flags(&twice).is_err());
        assert!(patch_from_flags(&PatchFlags::default()).unwrap().is_empty());
    }
}
