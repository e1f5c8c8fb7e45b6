//! Memory per committed update, and whose it is: the daemon's RSS over a run of label and
//! description PATCHes on every key in turn, against a raw process (this binary again,
//! cryptoki in process) that makes the token writes those updates make on its own copy of
//! the same token: per update the key's label (label updates) and one write of the key's
//! metadata record, which creates the record object and then its spare the first two
//! times a key is written, and rewrites the older of the two in place after that.
//!
//! The daemon's figures come twice: its RSS (`mem_daemon_*`) and the part of it that is
//! hsmkeyd's own heap (`mem_daemon_heap_*`, from `GET /v1/status` `memory.heap_bytes`, which
//! the PKCS#11 module's allocations are not in).
//!
//! At most [`MAX_KEYS`] keys are written. Reported in KiB per 1,000 updates, for the first pass over the keys (each key written
//! for the first time: the token gains its record object), the second (the spare object),
//! and the passes after them (every key has both: nothing new should stay).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use serde_json::json;

use std::os::unix::net::UnixStream;

use crate::client::{start_daemon, unix_conn, Conn};
use crate::token::{self, bulk_kid, check_output, vm_rss_kib};
use crate::{Ctx, Figures, Opts, Res};

/// Passes over the keys: the first two create objects, the rest are steady.
const PASSES: u32 = 4;
/// Keys written (the first of the token's bulk keys): enough for RSS to move by megabytes,
/// few enough that a 10,000-key run does not spend minutes on it.
const MAX_KEYS: u32 = 2000;
/// CKA_APPLICATION of hsmkeyd's metadata records (`keys/meta.rs`).
const META_APPLICATION: &[u8] = b"hsmkeyd.meta.v2";

/// The update `i` of a run: even ones change the label, odd ones the description.
fn is_label(i: u32) -> bool {
    i % 2 == 0
}

/// RSS growth per 1,000 updates, daemon and raw process, first pass and after.
pub(crate) fn memory_figures(o: &Opts, cached: &Path, figs: &mut Figures) -> Res<()> {
    let keys = o.keys.min(MAX_KEYS);
    let raw = {
        let work = tempfile::tempdir().ctx("tempdir")?;
        token::copy_dir(cached, work.path())?;
        let conf = token::write_softhsm_conf(work.path())?;
        let exe = std::env::current_exe().ctx("current_exe")?;
        let out = Command::new(exe)
            .arg("--raw-memory-child")
            .arg(&conf)
            .arg(work.path().join("pin"))
            .arg(keys.to_string())
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .ctx("running the raw memory child")?;
        check_output("raw memory child", &out)?;
        parse_samples(&String::from_utf8_lossy(&out.stdout))?
    };
    let (daemon, heap) = {
        let work = tempfile::tempdir().ctx("tempdir")?;
        token::copy_dir(cached, work.path())?;
        let conf = token::write_softhsm_conf(work.path())?;
        let (d, _) = start_daemon(work.path(), &conf, &work.path().join("pin"))?;
        let mut c = unix_conn(&d.sock)?;
        // RSS and, from the daemon's own count, the part of it that is ours (KiB).
        let mut samples = Vec::new();
        let mut heap = Vec::new();
        let mut sample = |c: &mut Conn<UnixStream>| -> Res<()> {
            heap.push(settled(c)? / 1024.0);
            samples.push(d.rss_mib()? * 1024.0);
            Ok(())
        };
        sample(&mut c)?;
        for i in 0..keys * PASSES {
            let body = if is_label(i) {
                json!({"label": format!("mem-{i}")})
            } else {
                json!({"description": format!("memory run {i}")})
            };
            c.patch(&bulk_kid(i % keys), &body)?;
            if i + 1 == keys || i + 1 == 2 * keys {
                sample(&mut c)?;
            }
        }
        sample(&mut c)?;
        drop(c);
        drop(d.stop()?);
        (samples, heap)
    };
    let per_1000 = |s: &[f64], from: usize, to: usize, updates: u32| {
        (s[to] - s[from]) * 1000.0 / f64::from(updates.max(1))
    };
    let steady = keys * (PASSES - 2);
    for (who, s) in [("raw", &raw), ("daemon", &daemon), ("daemon_heap", &heap)] {
        figs.add(
            &format!("mem_{who}_first_pass_per_1000"),
            per_1000(s, 0, 1, keys),
            "KiB",
        );
        figs.add(
            &format!("mem_{who}_second_pass_per_1000"),
            per_1000(s, 1, 2, keys),
            "KiB",
        );
        figs.add(
            &format!("mem_{who}_steady_per_1000"),
            per_1000(s, 2, 3, steady),
            "KiB",
        );
    }
    Ok(())
}

/// Waits until the worker has written every dirty record and destroyed every superseded
/// object, so a pass's sample holds the objects that pass made: the records of the last
/// label changes of a pass are written (created, in the first two passes) a moment after
/// it ends, and sampling before that charged their objects to the next pass. Returns the
/// daemon's `memory.heap_bytes` then.
fn settled(c: &mut Conn<UnixStream>) -> Res<f64> {
    let t0 = std::time::Instant::now();
    loop {
        let status = c.ok("GET", "/v1/status", "")?;
        let backlog = &status["cleanup_backlog"];
        if backlog["objects"] == 0 && backlog["records"] == 0 {
            let heap = status["memory"]["heap_bytes"].as_f64();
            return heap.ok_or(format!("no memory.heap_bytes in {status}"));
        }
        if t0.elapsed() > Duration::from_secs(60) {
            return Err(format!(
                "the worker did not catch up within 60 s: {backlog}"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn parse_samples(text: &str) -> Res<Vec<f64>> {
    let v: Vec<f64> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ctx(format!("raw memory child said {text:?}"))?;
    match v.len() {
        4 => Ok(v),
        _ => Err(format!("raw memory child said {text:?}")),
    }
}

/// The raw process: the token writes of `keys * PASSES` updates; prints its RSS (KiB)
/// before, after the first and the second pass, and at the end.
pub(crate) fn raw_memory_child(args: &[String]) -> Res<()> {
    let [conf, pin, keys] = args else {
        return Err("--raw-memory-child CONF PIN KEYS".into());
    };
    std::env::set_var("SOFTHSM2_CONF", conf);
    let keys: u32 = keys.parse().ctx("KEYS")?;
    let (p11, _, s) = token::raw_open(Path::new(pin))?;
    // One search, not one per key (each C_FindObjects reads the whole token).
    let mut by_id = std::collections::HashMap::new();
    let secret = [Attribute::Class(ObjectClass::SECRET_KEY)];
    for h in s.find_objects(&secret).ctx("C_FindObjects")? {
        for a in s
            .get_attributes(h, &[AttributeType::Id])
            .ctx("C_GetAttributeValue")?
        {
            if let Attribute::Id(id) = a {
                let _ = by_id.insert(hex::encode(id), h);
            }
        }
    }
    let mut objects = Vec::with_capacity(keys as usize);
    for k in 0..keys {
        objects.push(*by_id.get(&bulk_kid(k)).ok_or("a bulk key is missing")?);
    }
    let mut records: Vec<(Vec<ObjectHandle>, usize)> = vec![(Vec::new(), 0); keys as usize];
    let mut samples = vec![vm_rss_kib(std::process::id())?];
    for i in 0..keys * PASSES {
        let k = (i % keys) as usize;
        if is_label(i) {
            let label = format!("mem-{i}").into_bytes();
            s.update_attributes(objects[k], &[Attribute::Label(label)])
                .ctx("C_SetAttributeValue")?;
        }
        // A record as long as hsmkeyd's: `hsmkeyd-meta:<kid> <json>`.
        let record = json!({"kid": bulk_kid(k as u32), "seq": i, "description": format!("memory run {i}"),
            "roles": [], "updated_at": "2026-01-01T00:00:00Z"});
        let label = format!("hsmkeyd-meta:{} {record}", bulk_kid(k as u32)).into_bytes();
        let (objs, next) = &mut records[k];
        if objs.len() < 2 {
            let h = s
                .create_object(&[
                    Attribute::Class(ObjectClass::DATA),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Modifiable(true),
                    Attribute::Label(label),
                    Attribute::Application(META_APPLICATION.to_vec()),
                    Attribute::Value(Vec::new()),
                ])
                .ctx("C_CreateObject")?;
            objs.push(h);
        } else {
            s.update_attributes(objs[*next], &[Attribute::Label(label)])
                .ctx("C_SetAttributeValue")?;
            *next = 1 - *next;
        }
        if i + 1 == keys || i + 1 == 2 * keys {
            samples.push(vm_rss_kib(std::process::id())?);
        }
    }
    samples.push(vm_rss_kib(std::process::id())?);
    let text: Vec<String> = samples.iter().map(f64::to_string).collect();
    println!("{}", text.join(" "));
    drop(s);
    p11.finalize().ctx("C_Finalize")
}
