//! Instructions per update, counted by callgrind: what a label PATCH costs the daemon's
//! process in user-space instructions (SoftHSM's and OpenSSL's included: the whole
//! process), against one raw C_SetAttributeValue(CKA_LABEL) on the same token in a
//! re-executed child of this bench. Times on a shared VM drift by more than a change to
//! the request path moves them; these counts do not depend on what else the machine does
//! and repeat to within about 2% (the daemon's checkpoints and background record writes
//! fall into the counted window a little differently each run), so they show a change of
//! a few percent.
//!
//! Both processes run under `valgrind --tool=callgrind --instr-atstart=no`; counting is
//! switched on (`callgrind_control -i on`) only once they are warm and dumped
//! (`callgrind_control -d`) after the counted work, so start-up is not in the figure.
//! Valgrind's CPU hides the SHA extensions, so SHA-256 (the audit chain, etags) counts
//! several times what it costs natively. Skipped, with a line saying so, where valgrind is
//! not installed.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::client::{start_daemon_under, unix_conn};
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
    let (daemon, sha) = daemon_count(dir, conf, pin, n)?;
    figs.add("raw_instructions_per_set", raw, "k instr");
    figs.add("daemon_instructions_per_patch", daemon, "k instr");
    figs.add("daemon_own_instructions_per_patch", daemon - raw, "k instr");
    figs.add("daemon_sha256_instructions_per_patch", sha, "k instr");
    figs.add(
        "daemon_own_instructions_per_patch_less_sha256",
        daemon - raw - sha,
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

/// The first dump of a process counted into `out`.
fn first_dump(out: &Path) -> PathBuf {
    PathBuf::from(format!("{}.1", out.display()))
}

/// Dumps the counts of `pid` (the [`first_dump`]) and reads their total.
fn dump_total(pid: u32, out: &Path) -> Res<u64> {
    control(pid, &["-d"])?;
    let dumped = first_dump(out);
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
    dump_total(child.id(), out)
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

/// Thousands of instructions per label PATCH of the daemon, over one keep-alive
/// connection on the Unix socket, and of them those of SHA-256.
fn daemon_count(dir: &Path, conf: &Path, pin: &Path, n: u64) -> Res<(f64, f64)> {
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
    let total = dump_total(d.pid(), &out)?;
    let (status, _) = d.stop()?;
    if !status.success() {
        return Err(format!("the daemon under callgrind stopped with {status}"));
    }
    let sha = sha256_total(&first_dump(&out))?;
    let per = |count: u64| count as f64 / n as f64 / 1000.0;
    Ok((per(total), per(sha)))
}
