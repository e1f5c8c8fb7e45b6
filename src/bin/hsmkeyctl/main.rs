//! `hsmkeyctl`: the command-line client of hsmkeyd. Talks to the daemon over its Unix socket
//! (default; the caller is identified by its uid) or over HTTPS with a bearer token, prints
//! aligned tables for people and one JSON document with `--json` for scripts.
//!
//! Exit codes: 0 done; 1 refused by the daemon (4xx); 2 usage (bad arguments, unreadable
//! token file or CA); 3 the daemon or its token is unavailable (5xx, no connection);
//! 4 precondition failed (412: the key changed since the ETag given to `--if-match`).
//! `audit verify`: 0 the trail verifies; 10 broken chain (an entry changed, reordered or
//! inserted); 11 gap in HSMKEYD_SEQ (entries deleted); 12 unsigned tail (entries after
//! the last checkpoint); 13 a checkpoint signature does not verify; 2 usage; 3 the journal
//! or the key cannot be read.
#![forbid(unsafe_code)]

mod audit;
mod batch;
mod cli;
mod client;
mod patch;
mod show;
mod verify;

use std::io::{IsTerminal, Write};

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use hyper::header::{ACCEPT, IF_MATCH};
use hyper::{Method, Uri};
use serde_json::{json, Map, Value};
use zeroize::Zeroizing;

use cli::{AuditCmd, Cli, Cmd};
use client::{Answer, Target};

/// Why a command failed, and so its exit code.
#[derive(Debug)]
pub enum Failure {
    /// The invocation is wrong (exit 2).
    Usage(String),
    /// The daemon refused or failed (exit 1, 3 for 5xx, 4 for 412).
    Daemon {
        status: u16,
        code: String,
        message: String,
        field: Option<String>,
    },
    /// No daemon to talk to (exit 3).
    Unavailable(String),
    /// `audit verify` found the trail broken (its own exit codes).
    Verify(verify::Report),
}

impl Failure {
    fn exit_code(&self) -> u8 {
        match self {
            Failure::Usage(_) => 2,
            Failure::Daemon { status: 412, .. } => 4,
            Failure::Daemon { status, .. } if *status >= 500 => 3,
            Failure::Daemon { .. } => 1,
            Failure::Unavailable(_) => 3,
            Failure::Verify(r) => r.status,
        }
    }

    fn report(&self) {
        match self {
            Failure::Usage(m) | Failure::Unavailable(m) => eprintln!("hsmkeyctl: {m}"),
            Failure::Verify(r) => println!("{}", r.text),
            Failure::Daemon {
                status,
                code,
                message,
                field,
            } => {
                let field = field
                    .as_deref()
                    .map(|f| format!(" (field: {f})"))
                    .unwrap_or_default();
                eprintln!("hsmkeyctl: {message}{field} [{status} {code}]");
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hsmkeyctl: cannot start: {e}");
            return ExitCode::from(3);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            f.report();
            ExitCode::from(f.exit_code())
        }
    }
}

fn target(cli: &Cli) -> Result<Target, Failure> {
    let Some(url) = &cli.url else {
        return Ok(Target::Unix(cli.socket.clone()));
    };
    let uri: Uri = url
        .parse()
        .map_err(|e| Failure::Usage(format!("--url {url:?}: {e}")))?;
    if uri.scheme_str() != Some("https") || uri.host().is_none() {
        return Err(Failure::Usage(format!(
            "--url {url:?}: give https://host:port (the daemon's TLS front door)"
        )));
    }
    let token = match &cli.token_file {
        Some(p) => Zeroizing::new(
            std::fs::read_to_string(p)
                .map_err(|e| Failure::Usage(format!("--token-file {}: {e}", p.display())))?
                .trim()
                .to_string(),
        ),
        None => Zeroizing::new(std::env::var("HSMKEYD_TOKEN").unwrap_or_default()),
    };
    if token.is_empty() {
        return Err(Failure::Usage(
            "--url needs a bearer token: --token-file FILE or $HSMKEYD_TOKEN \
             (mint one with `hsmkeyctl token`)"
                .into(),
        ));
    }
    Ok(Target::Https {
        uri,
        cacert: cli.cacert.clone(),
        token,
    })
}

async fn run(cli: Cli) -> Result<(), Failure> {
    match &cli.command {
        Cmd::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(*shell, &mut cmd, "hsmkeyctl", &mut std::io::stdout());
            return Ok(());
        }
        Cmd::Man => {
            let mut out = Vec::new();
            clap_mangen::Man::new(Cli::command())
                .render(&mut out)
                .map_err(|e| Failure::Usage(e.to_string()))?;
            return std::io::stdout()
                .write_all(&out)
                .map_err(|e| Failure::Usage(e.to_string()));
        }
        Cmd::Audit {
            action:
                Some(AuditCmd::Verify {
                    file,
                    directory,
                    export,
                    key,
                }),
            ..
        } => {
            let source = match (file, directory, export) {
                (Some(f), _, _) => verify::Source::File(f),
                (_, Some(d), _) => verify::Source::Directory(d),
                (_, _, Some(e)) => verify::Source::Export(e),
                _ => verify::Source::Host,
            };
            let pem = match key {
                Some(p) => std::fs::read_to_string(p)
                    .map_err(|e| Failure::Usage(format!("--key {}: {e}", p.display())))?,
                None => {
                    let a = target(&cli)?
                        .send(Method::GET, "/v1/audit/key", None, &[])
                        .await?
                        .ok()?;
                    a.body["public_key_pem"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string()
                }
            };
            let point = verify::point_of_pem(&pem)
                .map_err(|e| Failure::Usage(format!("the audit-signing key: {e}")))?;
            let report = verify::verify(&verify::read(&source)?, &point);
            return if report.status == 0 {
                println!("{}", report.text);
                Ok(())
            } else {
                Err(Failure::Verify(report))
            };
        }
        Cmd::Audit {
            action: None,
            kid,
            event,
            request_id,
            since,
            lines,
        } => {
            let entries = audit::entries(&audit::Filter {
                kid: kid.as_deref(),
                event: event.as_deref(),
                request_id: request_id.as_deref(),
                since: since.as_deref(),
                lines: *lines,
            })?;
            if cli.json {
                show::json(&Value::Array(entries));
            } else {
                println!("{}", audit::table(&entries));
            }
            return Ok(());
        }
        _ => {}
    }
    let t = target(&cli)?;
    match &cli.command {
        Cmd::List {
            label,
            label_prefix,
            limit,
            cursor,
            expires_before,
            all,
        } => {
            let mut cursor = cursor.clone();
            let mut keys = Vec::new();
            let (total, next) = loop {
                let mut q: Vec<(&str, String)> = Vec::new();
                if let Some(l) = label {
                    q.push(("label", l.clone()));
                }
                if let Some(p) = label_prefix {
                    q.push(("label_prefix", p.clone()));
                }
                if let Some(d) = expires_before {
                    q.push(("expires_before", d.clone()));
                }
                if let Some(n) = limit {
                    q.push(("limit", n.to_string()));
                }
                if let Some(c) = &cursor {
                    q.push(("cursor", c.clone()));
                }
                let query =
                    serde_urlencoded::to_string(&q).map_err(|e| Failure::Usage(e.to_string()))?;
                let path = if query.is_empty() {
                    "/v1/keys".to_string()
                } else {
                    format!("/v1/keys?{query}")
                };
                let page = t.send(Method::GET, &path, None, &[]).await?.ok()?.body;
                keys.extend(page["keys"].as_array().cloned().unwrap_or_default());
                match page["next_cursor"].as_str() {
                    Some(c) if *all => cursor = Some(c.to_string()),
                    _ => break (page["total"].clone(), page["next_cursor"].clone()),
                }
            };
            if cli.json {
                show::json(&json!({"keys": keys, "total": total, "next_cursor": next}));
            } else {
                println!("{}", show::keys(&keys));
                if let Some(c) = next.as_str() {
                    eprintln!(
                        "{} of {total} keys shown; more with --all or --cursor {c}",
                        keys.len()
                    );
                }
            }
        }
        Cmd::Get { kid } => {
            let a = t
                .send(Method::GET, &format!("/v1/keys/{kid}"), None, &[])
                .await?
                .ok()?;
            print_key(&cli, &a);
        }
        Cmd::Update {
            kid,
            label,
            patch,
            if_match,
            dry_run,
        } => {
            let mut body = patch::patch_from_flags(patch)?;
            if let Some(l) = label {
                let _ = body.insert("label".into(), json!(l));
            }
            if body.is_empty() {
                return Err(Failure::Usage(
                    "nothing to change: give --label, --description, --roles, --usage, \
                     --not-before, --not-after, --sensitive, --no-extractable or a --clear-* \
                     option"
                        .into(),
                ));
            }
            let headers: Vec<_> = if_match
                .iter()
                .map(|e| (IF_MATCH, format!("\"{}\"", e.trim_matches('"'))))
                .collect();
            let a = t
                .send(
                    Method::PATCH,
                    &format!("/v1/keys/{kid}{}", dry_query(*dry_run)),
                    Some(&Value::Object(body)),
                    &headers,
                )
                .await?
                .ok()?;
            print_change(&cli, &a, *dry_run);
        }
        Cmd::Batch {
            kids,
            label_prefix,
            role,
            patch,
            if_match,
            dry_run,
        } => {
            batch::run(
                &cli,
                &t,
                batch::BatchArgs {
                    kids,
                    label_prefix,
                    role,
                    patch,
                    if_match,
                    dry_run: *dry_run,
                },
            )
            .await?
        }
        Cmd::Token { scopes, ttl, quiet } => {
            let mut body = json!({ "scopes": scopes });
            if let Some(t) = ttl {
                body["ttl_s"] = json!(t);
            }
            let a = t
                .send(Method::POST, "/v1/auth/token", Some(&body), &[])
                .await?
                .ok()?;
            if *quiet {
                println!("{}", show::cell(&a.body["token"]));
            } else if cli.json {
                show::json(&a.body);
            } else {
                println!("{}", show::fields(&a.body));
            }
        }
        Cmd::Create {
            key_type,
            label,
            bits,
            curve,
            description,
            roles,
            usage,
            no_usage,
            kid,
            dry_run,
        } => {
            let mut body = json!({ "type": key_type, "label": label });
            for (name, value) in [
                ("bits", bits.map(|b| json!(b))),
                ("curve", curve.as_ref().map(|c| json!(c))),
                ("description", description.as_ref().map(|d| json!(d))),
                ("roles", roles.as_ref().map(|r| json!(r))),
                ("kid", kid.as_ref().map(|k| json!(k))),
            ] {
                if let Some(v) = value {
                    body[name] = v;
                }
            }
            let mut flags = Map::new();
            for (names, on) in [(usage, true), (no_usage, false)] {
                for n in names.iter().flatten() {
                    let _ = flags.insert(n.clone(), json!(on));
                }
            }
            if !flags.is_empty() {
                body["usage"] = Value::Object(flags);
            }
            let a = t
                .send(
                    Method::POST,
                    &format!("/v1/keys{}", dry_query(*dry_run)),
                    Some(&body),
                    &[],
                )
                .await?
                .ok()?;
            print_change(&cli, &a, *dry_run);
        }
        Cmd::Delete {
            kid,
            if_match,
            yes,
            dry_run,
        } => {
            if *dry_run {
                let path = format!("/v1/keys/{kid}?dry_run=true");
                let a = t.send(Method::DELETE, &path, None, &[]).await?.ok()?;
                print_dry_run(&cli, &a);
                return Ok(());
            }
            if !*yes
                && std::io::stdin().is_terminal()
                && !confirm(&format!(
                    "Destroy every object of key {kid} in the token? This cannot be undone. [y/N] "
                ))
            {
                return Err(Failure::Usage("not deleted".into()));
            }
            let headers: Vec<_> = if_match
                .iter()
                .map(|e| (IF_MATCH, format!("\"{}\"", e.trim_matches('"'))))
                .collect();
            let _ = t
                .send(Method::DELETE, &format!("/v1/keys/{kid}"), None, &headers)
                .await?
                .ok()?;
            if cli.json {
                show::json(&json!({ "deleted": kid }));
            } else {
                println!("key {kid} deleted");
            }
        }
        Cmd::Public { kid, jwk } => {
            let path = format!("/v1/keys/{kid}/public");
            if *jwk || cli.json {
                let headers = [(ACCEPT, "application/jwk+json".to_string())];
                let a = t.send(Method::GET, &path, None, &headers).await?.ok()?;
                show::json(&a.body);
            } else {
                let text = t.send_text(Method::GET, &path).await?;
                print!("{text}");
            }
        }
        Cmd::Status => {
            let a = t.send(Method::GET, "/v1/status", None, &[]).await?.ok()?;
            if cli.json {
                show::json(&a.body);
            } else {
                println!("{}", show::fields(&a.body));
            }
        }
        Cmd::Audit { .. } | Cmd::Completions { .. } | Cmd::Man => unreachable!("handled above"),
    }
    Ok(())
}

/// The answer of an update or a create: the key, what changed and the audit id (or the
/// dry run's preview).
fn print_change(cli: &Cli, a: &Answer, dry_run: bool) {
    if dry_run {
        print_dry_run(cli, a);
    } else if cli.json {
        show::json(&a.body);
    } else {
        println!("{}", show::fields(&a.body["key"]));
        if !a.body["changed"].is_null() {
            println!("changed: {}", show::cell(&a.body["changed"]));
        }
        println!("audit id: {}", show::cell(&a.body["audit_id"]));
    }
}

/// `?dry_run=true` when asked for.
fn dry_query(dry_run: bool) -> &'static str {
    if dry_run {
        "?dry_run=true"
    } else {
        ""
    }
}

/// A dry run's answer: each change with its values, then the key as it would be.
fn print_dry_run(cli: &Cli, a: &Answer) {
    if cli.json {
        show::json(&a.body);
        return;
    }
    println!("dry run: nothing was written");
    let mut t = show::table(&["FIELD", "BEFORE", "AFTER"]);
    if let Some(changes) = a.body["changes"].as_object() {
        for (field, c) in changes {
            let _ = t.add_row(vec![
                field.clone(),
                show::cell(&c["before"]),
                show::cell(&c["after"]),
            ]);
        }
    }
    println!("{t}");
    println!("{}", show::fields(&a.body["key"]));
}

/// Asks on the terminal; true for y or yes.
fn confirm(question: &str) -> bool {
    eprint!("{question}");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    if std::io::stdin().read_line(&mut line).is_err() {
        return false;
    }
    matches!(line.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

fn print_key(cli: &Cli, a: &Answer) {
    if cli.json {
        show::json(&a.body);
    } else {
        println!("{}", show::fields(&a.body));
    }
}
