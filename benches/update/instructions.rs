//! Instructions per request, counted by callgrind: what a label PATCH costs the daemon's
//! process in user-space instructions (SoftHSM's and OpenSSL's included: the whole
//! process), against one raw C_SetAttributeValue(CKA_LABEL) on the same token in a
//! re-executed child of this bench; and what a `GET /v1/keys/{kid}` costs it on the Unix
//! socket and over HTTPS (bearer token, keep-alive). Times on a shared VM drift by more
//! than a change to the request path moves them; these counts do not depend on what else
//! the machine does and repeat to within a few percent (the daemon's checkpoints, status
//! ticks and background record writes fall into the counted window a little differently
//! each run: about 2% for the PATCH, up to 7% for the GETs), so they show a change of a
//! few percent.
//!
//! Both processes run under `valgrind --tool=callgrind --instr-atstart=no`; counting is
//! switched on (`callgrind_control -i on`) only once they are warm, zeroed after each
//! warm-up (`-z`) and dumped (`-d`) after the counted work, so start-up is not in the
//! figures. Valgrind's CPU hides the SHA extensions, so SHA-256 (the audit chain, etags,
//! the verified-token cache's key) counts several times what it costs natively; the
//! part spent there is reported apart. Skipped, with a line saying so, where valgrind is
//! not installed.
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::client::{start_daemon_under, tls_conn, unix_conn};
use crate::daemon::mint;
use crate::token::{bulk_kid, check_output, handles, raw_open, set_label};
use crate::{Ctx, Figures, Opts, Res};

/// PATCHes (and raw sets) counted; the same number warm up first.
fn counted(o: &Opts) -> u64 {
    if o.reps == 1 {
        100
    } else {
        300
    }
}

/// `raw_instructions_per_set`, `daemon_instructions_per_patch` (floor: the raw set) and
/// `daemon_own_instructions_per_patch` (the daemon's count less the raw set's).
pub(crate) fn instruction_figures(
    o: &Opts,
    dir: &Path,
    conf: &Path,
    pin: &Path,
    figs: &mut Figures,
) -> Res<()> {
    if !Command::new("valgrind")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success())
    {
        println!("instructions: valgrind is not installed; not counted");
        return Ok(());
    }
    let n = counted(o);
    let raw = raw_count(dir, conf, pin, n)?;
    let counts = daemon_counts(dir, conf, pin, n)?;
    let (daemon, sha) = (counts.patch, counts.patch_sha256);
    figs.add("raw_instructions_per_set", raw, "k instr");
    figs.add("daemon_instructions_per_patch", daemon, "k instr");
    figs.add("daemon_own_instructions_per_patch", daemon - raw, "k instr");
    figs.add("daemon_sha256_instructions_per_patch", sha, "k instr");
    figs.add(
        "daemon_own_instructions_per_patch_less_sha256",
        daemon - raw - sha,
        "k instr",
    );
    figs.add(
        "daemon_instructions_per_get_unix",
        counts.get_unix,
        "k instr",
    );
    figs.add(
        "daemon_instructions_per_get_https",
        counts.get_https,
        "k instr",
    );
    figs.add(
        "daemon_sha256_instructions_per_get_https",
        counts.get_https_sha256,
        "k instr",
    );
    Ok(())
}

/// The instructions of a callgrind dump spent in the `sha2` crate's own functions
/// (`callgrind_annotate`'s self cost per function; valgrind runs its software rounds).
fn sha256_total(dumped: &Path) -> Res<u64> {
    let out = Command::new("callgrind_annotate")
        .arg("--threshold=100")
        .arg(dumped)
        .output()
        .ctx("running callgrind_annotate")?;
    check_output("callgrind_annotate", &out)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let count = |l: &str| {
        let n = l.split_whitespace().next()?;
        n.replace(',', "").parse::<u64>().ok()
    };
    Ok(text
        .lines()
        .filter(|l| l.contains(":sha2::"))
        .filter_map(count)
        .sum())
}

/// `valgrind --tool=callgrind` with counting off until `callgrind_control -i on`.
fn callgrind(out: &Path) -> Command {
    let mut c = Command::new("valgrind");
    c.arg("--tool=callgrind")
        .arg("--instr-atstart=no")
        .arg(format!("--callgrind-out-file={}", out.display()));
    c
}

/// `callgrind_control <args> <pid>`.
fn control(pid: u32, args: &[&str]) -> Res<()> {
    let out = Command::new("callgrind_control")
        .args(args)
        .arg(pid.to_string())
        .output()
        .ctx("running callgrind_control")?;
    check_output(&format!("callgrind_control {}", args.join(" ")), &out)
}

/// The `nth` dump (from 1) of a process counted into `out`.
fn dump_path(out: &Path, nth: u32) -> PathBuf {
    PathBuf::from(format!("{}.{nth}", out.display()))
}

/// Dumps the counts of `pid` since its last dump or zeroing (its `nth` dump) and reads
/// their total.
fn dump_total(pid: u32, out: &Path, nth: u32) -> Res<u64> {
    control(pid, &["-d"])?;
    let dumped = dump_path(out, nth);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(&dumped).unwrap_or_default();
        let total = text
            .lines()
            .find_map(|l| l.strip_prefix("summary:"))
            .map(|v| v.trim().parse::<u64>());
        if let Some(total) = total {
            return total.ctx("callgrind summary");
        }
        if Instant::now() > deadline {
            return Err(format!("no callgrind dump in {}", dumped.display()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Thousands of instructions per raw label set, from a child of this bench.
fn raw_count(dir: &Path, conf: &Path, pin: &Path, n: u64) -> Res<f64> {
    let out = dir.join("raw.callgrind");
    let mut child = callgrind(&out)
        .arg(std::env::current_exe().ctx("current_exe")?)
        .arg("--raw-instructions-child")
        .arg(conf)
        .arg(pin)
        .arg(n.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ctx("starting the raw child under callgrind")?;
    let mut lines = BufReader::new(child.stdout.take().ok_or("no child stdout")?);
    let counted = raw_child_counted(&mut child, &mut lines, &out);
    drop(child.stdin.take());
    let status = child.wait().ctx("waiting for the raw child")?;
    let total = counted?;
    if !status.success() {
        return Err(format!("the raw child under callgrind failed: {status}"));
    }
    Ok(total as f64 / n as f64 / 1000.0)
}

/// Walks the child through warm, counted, dumped.
fn raw_child_counted(
    child: &mut Child,
    lines: &mut BufReader<ChildStdout>,
    out: &Path,
) -> Res<u64> {
    expect(lines, "warm")?;
    control(child.id(), &["-i", "on"])?;
    let stdin = child.stdin.as_mut().ok_or("no child stdin")?;
    stdin
        .write_all(b"go\n")
        .ctx("telling the raw child to go")?;
    stdin.flush().ctx("flush")?;
    expect(lines, "done")?;
    dump_total(child.id(), out, 1)
}

fn expect(lines: &mut BufReader<ChildStdout>, word: &str) -> Res<()> {
    let mut line = String::new();
    let _ = lines.read_line(&mut line).ctx("reading the raw child")?;
    match line.trim() == word {
        true => Ok(()),
        false => Err(format!("the raw child said {line:?}, not {word:?}")),
    }
}

/// The child: `--raw-instructions-child CONF PIN N`. Opens the token, sets the first bulk
/// key's label N times to warm up, says `warm`, waits for `go` (counting is on then), sets
/// it N times more, says `done` and waits for its stdin to close (the dump is taken then).
pub(crate) fn raw_instructions_child(args: &[String]) -> Res<()> {
    let [conf, pin, n] = args else {
        return Err("--raw-instructions-child CONF PIN N".into());
    };
    let n: u64 = n.parse().ctx("N")?;
    // This process has one thread until the module starts its own.
    std::env::set_var("SOFTHSM2_CONF", conf);
    let (_p11, _, s) = raw_open(Path::new(pin))?;
    let key = handles(&s, &bulk_kid(0))?[0];
    let mut stdout = std::io::stdout();
    let mut stdin = std::io::stdin().lock();
    let mut line = String::new();
    for i in 0..n {
        set_label(&s, key, format!("warm-{}", i % 2))?;
    }
    writeln!(stdout, "warm").ctx("stdout")?;
    let _ = stdin.read_line(&mut line).ctx("stdin")?;
    for i in 0..n {
        set_label(&s, key, format!("counted-{}", i % 2))?;
    }
    writeln!(stdout, "done").ctx("stdout")?;
    while stdin.read_line(&mut line).ctx("stdin")? > 0 {}
    Ok(())
}

/// Thousands of instructions the daemon spends per request, each over one keep-alive
/// connection.
struct DaemonCounts {
    /// A label PATCH on the Unix socket.
    patch: f64,
    /// Of it, SHA-256's.
    patch_sha256: f64,
    /// `GET /v1/keys/{kid}` on the Unix socket.
    get_unix: f64,
    /// The same GET over HTTPS with a bearer token (its verification cached).
    get_https: f64,
    /// Of it, SHA-256's (the verified-token cache's key).
    get_https_sha256: f64,
}

/// Label PATCHes, then GETs on the Unix socket, then GETs over HTTPS, `n` of each counted
/// after `n` to warm up (counters zeroed after the warm-up).
fn daemon_counts(dir: &Path, conf: &Path, pin: &Path, n: u64) -> Res<DaemonCounts> {
    let out = dir.join("daemon.callgrind");
    let (d, _) = start_daemon_under(dir, conf, pin, callgrind(&out))?;
    let mut c = unix_conn(&d.sock)?;
    let kid = bulk_kid(1);
    let mut patch =
        |tag: &str, i: u64| c.patch(&kid, &json!({"label": format!("{tag}-{}", i % 2)}));
    for i in 0..n {
        patch("warm", i)?;
    }
    control(d.pid(), &["-i", "on"])?;
    for i in 0..n {
        patch("counted", i)?;
    }
    let patches = dump_total(d.pid(), &out, 1)?;
    let sha = sha256_total(&dump_path(&out, 1))?;
    let path = format!("/v1/keys/{kid}");
    let get = |c: &mut dyn FnMut() -> Res<()>, nth: u32| -> Res<u64> {
        (0..n).try_for_each(|_| c())?;
        control(d.pid(), &["-z"])?;
        (0..n).try_for_each(|_| c())?;
        dump_total(d.pid(), &out, nth)
    };
    let mut unix = unix_conn(&d.sock)?;
    let get_unix = get(&mut || unix.ok("GET", &path, "").map(drop), 2)?;
    let bearer = mint(&mut unix)?;
    let mut https = tls_conn(&d, &bearer)?;
    let get_https = get(&mut || https.ok("GET", &path, "").map(drop), 3)?;
    let get_https_sha = sha256_total(&dump_path(&out, 3))?;
    let (status, _) = d.stop()?;
    if !status.success() {
        return Err(format!("the daemon under callgrind stopped with {status}"));
    }
    let per = |count: u64| count as f64 / n as f64 / 1000.0;
    Ok(DaemonCounts {
        patch: per(patches),
        patch_sha256: per(sha),
        get_unix: per(get_unix),
        get_https: per(get_https),
        get_https_sha256: per(get_https_sha),
    })
}
