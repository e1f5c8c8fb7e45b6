//! `hsmkeyctl batch`: one patch for many keys (`POST /v1/keys/batch`), and its answer: the
//! keys changed, or each key that failed its checks, or which keys a failed batch set back.

use hyper::Method;
use serde_json::{json, Map, Value};

use crate::cli::Cli;
use crate::client::Target;
use crate::patch::{patch_from_flags, PatchFlags};
use crate::{dry_query, show, Failure};

/// What `hsmkeyctl batch` was given.
pub(crate) struct BatchArgs<'a> {
    pub(crate) kids: &'a Option<Vec<String>>,
    pub(crate) label_prefix: &'a Option<String>,
    pub(crate) role: &'a Option<String>,
    pub(crate) patch: &'a PatchFlags,
    pub(crate) if_match: &'a [String],
    pub(crate) dry_run: bool,
}

/// Runs the batch and prints its answer.
pub(crate) async fn run(cli: &Cli, t: &Target, args: BatchArgs<'_>) -> Result<(), Failure> {
    let select = match (args.kids, args.label_prefix, args.role) {
        (Some(k), _, _) => json!({ "kids": k }),
        (_, Some(p), _) => json!({ "label_prefix": p }),
        (_, _, Some(r)) => json!({ "role": r }),
        _ => {
            return Err(Failure::Usage(
                "give --kids, --label-prefix or --role".into(),
            ))
        }
    };
    let patch = patch_from_flags(args.patch)?;
    if patch.is_empty() {
        return Err(Failure::Usage(
            "nothing to change: give --description, --roles, --usage, --not-before, \
             --not-after, --sensitive, --no-extractable or a --clear-* option"
                .into(),
        ));
    }
    let mut if_match = Map::new();
    for pair in args.if_match {
        let Some((kid, etag)) = pair.split_once('=') else {
            return Err(Failure::Usage(format!(
                "--if-match {pair:?}: give KID=ETAG"
            )));
        };
        let _ = if_match.insert(kid.to_string(), json!(etag.trim_matches('"')));
    }
    let mut body = json!({ "select": select, "patch": patch });
    if !if_match.is_empty() {
        body["if_match"] = Value::Object(if_match);
    }
    let a = t
        .send(
            Method::POST,
            &format!("/v1/keys/batch{}", dry_query(args.dry_run)),
            Some(&body),
            &[],
        )
        .await?;
    if a.status >= 300 {
        if cli.json {
            show::json(&a.body);
        } else {
            print_failures(&a.body);
        }
        return a.ok().map(|_| ());
    }
    if cli.json {
        show::json(&a.body);
        return Ok(());
    }
    let keys = a.body["keys"].as_array().cloned().unwrap_or_default();
    if args.dry_run {
        println!("dry run: nothing was written");
        let mut t = show::table(&["KID", "FIELD", "BEFORE", "AFTER"]);
        for k in &keys {
            for (field, c) in k["changes"].as_object().into_iter().flatten() {
                let _ = t.add_row(vec![
                    show::cell(&k["kid"]),
                    field.clone(),
                    show::cell(&c["before"]),
                    show::cell(&c["after"]),
                ]);
            }
        }
        println!("{t}");
    } else {
        let mut t = show::table(&["KID", "LABEL", "CHANGED"]);
        for k in &keys {
            let _ = t.add_row(vec![
                show::cell(&k["kid"]),
                show::cell(&k["key"]["label"]),
                show::cell(&k["changed"]),
            ]);
        }
        println!("{t}");
    }
    println!("batch id: {}", show::cell(&a.body["batch_id"]));
    println!("audit id: {}", show::cell(&a.body["audit_id"]));
    Ok(())
}

/// A refused or failed batch: each failing key, and which keys were set back, on stderr
/// (the one-line reason follows from [`Failure::report`]).
fn print_failures(body: &Value) {
    if let Some(failures) = body["failures"].as_array() {
        let mut t = show::table(&["KID", "STATUS", "ERROR", "MESSAGE"]);
        for f in failures {
            let _ = t.add_row(vec![
                show::cell(&f["kid"]),
                show::cell(&f["status"]),
                show::cell(&f["error"]),
                show::cell(&f["message"]),
            ]);
        }
        eprintln!("{t}");
    }
    for (what, key) in [("set back", "rolled_back"), ("not started", "not_started")] {
        if body[key].as_array().is_some_and(|l| !l.is_empty()) {
            eprintln!("{what}: {}", show::cell(&body[key]));
        }
    }
    if let Some(left) = body["not_rolled_back"].as_array().filter(|l| !l.is_empty()) {
        let kids: Vec<Value> = left.iter().map(|f| f["kid"].clone()).collect();
        eprintln!("NOT set back: {}", show::cell(&Value::Array(kids)));
    }
}
