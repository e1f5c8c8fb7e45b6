//! The token: building the cached SoftHSM token the bench copies, and the raw floor, the
//! same PKCS#11 calls made with cryptoki in this process (plus the re-executed RSS child).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, AttributeType, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use crate::{pct, sample, secs, Ctx, Figures, Opts, Res};

pub(crate) const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub(crate) const TOKEN_LABEL: &str = "hsmkeyd-bench";
const USER_PIN: &str = "bench-user-pin-5678";
/// CKA_ID prefix of the bulk AES keys (the 4-byte big-endian index follows).
const BULK_PREFIX: &str = "b0";
pub(crate) const EC_PAIRS: u32 = 64;
/// The attributes hsmkeyd reads per object in its scan (`READ` in src/hsm/objects.rs).
#[rustfmt::skip]
const READ: &[AttributeType] = {
    use AttributeType::*;
    &[Class, Id, Label, KeyType, EcParams, ModulusBits, Modulus, ValueLen, Sensitive,
      Extractable, Modifiable, Sign, Verify, Encrypt, Decrypt, Wrap, Unwrap, Derive, Application]
};

// ---------------------------------------------------------------- token

pub(crate) fn bulk_kid(index: u32) -> String {
    format!("{BULK_PREFIX}{index:08x}")
}

pub(crate) fn ec_kid(index: u32) -> String {
    format!("ec{index:04x}")
}

/// The cached token directory for `keys` keys, built when missing.
pub(crate) fn cached_token(bench_dir: &Path, keys: u32) -> Res<PathBuf> {
    let dir = bench_dir.join(format!("token-{keys}"));
    if dir.join("complete").exists() {
        return Ok(dir);
    }
    let t0 = Instant::now();
    eprintln!("building the cached token {} (once)...", dir.display());
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("tokens")).ctx("creating the token dir")?;
    let conf = write_softhsm_conf(&dir)?;
    let pin = dir.join("pin");
    fs::write(&pin, format!("{USER_PIN}\n")).ctx("writing the PIN file")?;
    fs::set_permissions(&pin, fs::Permissions::from_mode(0o600)).ctx("chmod pin")?;
    let out = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", &conf)
        .args(["--init-token", "--free", "--label", TOKEN_LABEL])
        .args(["--so-pin", "bench-so-pin-1234", "--pin", USER_PIN])
        .output()
        .ctx("running softhsm2-util (run ./softhsm-setup.sh --deps-only)")?;
    check_output("softhsm2-util --init-token", &out)?;
    // The pairs first: each `gen` is a process that loads the whole token.
    for i in 0..EC_PAIRS {
        let gen = format!("gen --kind ec-p256 --id {} --label ec-pair-{i}", ec_kid(i));
        devtoken(&conf, &pin, &gen)?;
    }
    let bulk = format!("bulk --count {keys} --id-prefix {BULK_PREFIX} --label-prefix bulk-");
    devtoken(&conf, &pin, &bulk)?;
    fs::write(dir.join("complete"), "").ctx("marking the token complete")?;
    eprintln!("token built in {:.1} s", t0.elapsed().as_secs_f64());
    Ok(dir)
}

/// Runs hsmkeyd-devtoken with `args` (split at spaces) on the token.
fn devtoken(conf: &Path, pin: &Path, args: &str) -> Res<()> {
    let out = Command::new(env!("CARGO_BIN_EXE_hsmkeyd-devtoken"))
        .env("SOFTHSM2_CONF", conf)
        .args(["--module", SOFTHSM, "--token-label", TOKEN_LABEL])
        .arg("--pin-file")
        .arg(pin)
        .args(args.split(' '))
        .output()
        .ctx("running hsmkeyd-devtoken")?;
    check_output(&format!("hsmkeyd-devtoken {args}"), &out)
}

pub(crate) fn check_output(what: &str, out: &std::process::Output) -> Res<()> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.success() {
        true => Ok(()),
        false => Err(format!("{what}: {}", stderr.trim())),
    }
}

/// (Re)writes `dir/softhsm2.conf` pointing at `dir/tokens` (the path is absolute).
pub(crate) fn write_softhsm_conf(dir: &Path) -> Res<PathBuf> {
    let conf = dir.join("softhsm2.conf");
    let text = format!(
        "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
        dir.join("tokens").display()
    );
    fs::write(&conf, text).ctx("writing softhsm2.conf")?;
    Ok(conf)
}

pub(crate) fn copy_dir(from: &Path, to: &Path) -> Res<()> {
    fs::create_dir_all(to).ctx(format!("creating {}", to.display()))?;
    for entry in fs::read_dir(from).ctx(format!("reading {}", from.display()))? {
        let entry = entry.ctx("reading a directory entry")?;
        let target = to.join(entry.file_name());
        if entry.file_type().ctx("file type")?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target).ctx(format!("copying {}", target.display()))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- raw PKCS#11 floor

/// Loads the module, finds the token, opens a RW session and logs in.
pub(crate) fn raw_open(pin_file: &Path) -> Res<(Pkcs11, Slot, Session)> {
    let p11 = Pkcs11::new(SOFTHSM).ctx("loading SoftHSM")?;
    let args = CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK);
    p11.initialize(args).ctx("C_Initialize")?;
    let ours = |s: &Slot| {
        p11.get_token_info(*s)
            .is_ok_and(|i| i.label().trim() == TOKEN_LABEL)
    };
    let slots = p11.get_slots_with_token().ctx("C_GetSlotList")?;
    let slot = *slots
        .iter()
        .find(|s| ours(s))
        .ok_or("no bench token in the copy")?;
    let session = p11.open_rw_session(slot).ctx("C_OpenSession")?;
    let pin = fs::read_to_string(pin_file).ctx("reading the PIN")?;
    let pin = AuthPin::from(pin.trim_end().to_string());
    session.login(UserType::User, Some(&pin)).ctx("C_Login")?;
    Ok((p11, slot, session))
}

/// One pass over every object with hsmkeyd's attribute list.
fn raw_scan(s: &Session) -> Res<()> {
    for h in s.find_objects(&[]).ctx("C_FindObjects")? {
        s.get_attributes(h, READ).ctx("C_GetAttributeValue")?;
    }
    Ok(())
}

pub(crate) fn handles(s: &Session, kid: &str) -> Res<Vec<ObjectHandle>> {
    let id = hex::decode(kid).ctx("kid")?;
    let found = s.find_objects(&[Attribute::Id(id)]).ctx("C_FindObjects")?;
    match found.is_empty() {
        true => Err(format!("no object with id {kid} in the token")),
        false => Ok(found),
    }
}

pub(crate) fn set_label(s: &Session, h: ObjectHandle, label: String) -> Res<()> {
    let attr = Attribute::Label(label.into_bytes());
    s.update_attributes(h, &[attr]).ctx("C_SetAttributeValue")
}

/// The raw work of a start: C_Initialize, login, one full scan (then C_Finalize, untimed).
pub(crate) fn raw_start(pin: &Path) -> Res<Duration> {
    let t0 = Instant::now();
    let (p11, _, s) = raw_open(pin)?;
    raw_scan(&s)?;
    let took = t0.elapsed();
    drop(s);
    p11.finalize().ctx("C_Finalize")?;
    Ok(took)
}

pub(crate) fn raw_floor(o: &Opts, pin: &Path, figs: &mut Figures) -> Res<()> {
    let (p11, _, s) = raw_open(pin)?;
    let key = handles(&s, &bulk_kid(0))?[0];
    let secret = sample(o.seconds, |n| set_label(&s, key, format!("raw-{}", n % 2)))?;
    let pair = handles(&s, &ec_kid(0))?;
    if pair.len() != 2 {
        return Err(format!("EC pair: {} objects, not 2", pair.len()));
    }
    let pair_set = |n: usize| {
        let label = format!("raw-pair-{}", n % 2);
        pair.iter()
            .try_for_each(|h| set_label(&s, *h, label.clone()))
    };
    let pair_lat = sample(o.seconds, pair_set)?;
    drop(s);
    p11.finalize().ctx("C_Finalize")?;
    let two = raw_two_threads(pin, o.seconds)?;

    let mut starts = (0..o.reps)
        .map(|_| raw_start(pin))
        .collect::<Res<Vec<_>>>()?;
    starts.sort();
    figs.add("raw_set_label_secret", pct(&secret, 50.0), "ms");
    figs.add("raw_set_label_pair", pct(&pair_lat, 50.0), "ms");
    figs.add("raw_set_2threads", two.rate, "sets/s");
    // What those sets cost the machine (this process, its idle main thread included).
    figs.add("raw_cpu_per_set", two.cpu_per_set_ms, "ms");
    figs.add("raw_cores_2threads", two.cores, "cores");
    figs.add("raw_switches_per_set", two.switches_per_set, "switches");
    figs.add("raw_start", pct(&starts, 50.0), "ms");
    figs.add("raw_rss", raw_rss(pin)?, "MiB");
    Ok(())
}

/// Label sets from two threads on distinct keys, each with its own session, and what they
/// cost this process.
pub(crate) struct TwoThreads {
    pub(crate) rate: f64,
    cpu_per_set_ms: f64,
    cores: f64,
    switches_per_set: f64,
}

/// Opens the token, sets labels from two threads for `seconds`, finalizes: the raw floor
/// of the throughput figures. Opened here each time, so that it can take turns with a
/// daemon on the same token (SoftHSM file tokens take one writing process at a time).
pub(crate) fn raw_two_threads(pin: &Path, seconds: f64) -> Res<TwoThreads> {
    let (p11, slot, s) = raw_open(pin)?;
    let keys = [40, 41].map(|i| handles(&s, &bulk_kid(i)).map(|h| h[0]));
    let keys = [keys[0].clone()?, keys[1].clone()?];
    let (t0, deadline) = (Instant::now(), Instant::now() + secs(seconds));
    let (cpu0, switches0) = own_usage()?;
    let sets = std::thread::scope(|scope| {
        let spawn = |h: ObjectHandle| {
            let p11 = p11.clone();
            scope.spawn(move || -> Res<u64> {
                let ts = p11.open_rw_session(slot).ctx("C_OpenSession (thread)")?;
                let mut n = 0;
                while Instant::now() < deadline {
                    set_label(&ts, h, format!("raw-t-{}", n % 2))?;
                    n += 1;
                }
                Ok(n)
            })
        };
        let workers: Vec<_> = keys.into_iter().map(spawn).collect();
        let joined = workers.into_iter().map(|w| w.join().expect("raw thread"));
        joined.sum::<Res<u64>>()
    })?;
    let elapsed = t0.elapsed().as_secs_f64();
    let (cpu1, switches1) = own_usage()?;
    drop(s);
    p11.finalize().ctx("C_Finalize")?;
    if cpu1 <= cpu0 || switches1 <= switches0 {
        return Err("getrusage did not move over the raw 2-thread sets".into());
    }
    let n = sets.max(1) as f64;
    Ok(TwoThreads {
        rate: sets as f64 / elapsed,
        cpu_per_set_ms: (cpu1 - cpu0) * 1000.0 / n,
        cores: (cpu1 - cpu0) / elapsed,
        switches_per_set: (switches1 - switches0) as f64 / n,
    })
}

/// RSS of a separate process that initialized, logged in and scanned (this binary again).
fn raw_rss(pin: &Path) -> Res<f64> {
    let conf = std::env::var("SOFTHSM2_CONF").ctx("SOFTHSM2_CONF")?;
    let exe = std::env::current_exe().ctx("current_exe")?;
    let mut child = Command::new(exe);
    let out = child.arg("--raw-rss-child").arg(conf).arg(pin).output();
    let out = out.ctx("running the raw RSS child")?;
    check_output("raw RSS child", &out)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let kib = text.trim().parse::<f64>();
    Ok(kib.ctx(format!("raw RSS child said {text:?}"))? / 1024.0)
}

pub(crate) fn raw_rss_child(conf: &str, pin: &str) -> Res<()> {
    std::env::set_var("SOFTHSM2_CONF", conf);
    let (p11, _, s) = raw_open(Path::new(pin))?;
    raw_scan(&s)?;
    println!("{}", vm_rss_kib(std::process::id())?);
    drop(s);
    p11.finalize().ctx("C_Finalize")
}

/// The machine's CPU time so far, from the `cpu` line of `/proc/stat`: (steal, all), in
/// clock ticks. Steal is the time the hypervisor gave this guest's cores to other guests.
#[derive(Clone, Copy)]
pub(crate) struct CpuTicks {
    steal: u64,
    all: u64,
}

impl CpuTicks {
    pub(crate) fn now() -> Res<CpuTicks> {
        let stat = fs::read_to_string("/proc/stat").ctx("reading /proc/stat")?;
        let line = stat.lines().find(|l| l.starts_with("cpu "));
        let line = line.ok_or("no cpu line in /proc/stat")?;
        let f: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ctx("/proc/stat")?;
        // user nice system idle iowait irq softirq steal [guest guest_nice]; the guest
        // times are already counted in user and nice.
        let steal = *f.get(7).ok_or("no steal field in /proc/stat")?;
        Ok(CpuTicks {
            steal,
            all: f.iter().take(8).sum(),
        })
    }

    /// The share of the machine's CPU time since `self` that went to other guests, in %.
    pub(crate) fn steal_pct_since(self) -> Res<f64> {
        let now = CpuTicks::now()?;
        let all = now.all.saturating_sub(self.all).max(1) as f64;
        Ok(now.steal.saturating_sub(self.steal) as f64 * 100.0 / all)
    }
}

pub(crate) fn vm_rss_kib(pid: u32) -> Res<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ctx("reading /proc")?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"));
    let kib = line.and_then(|l| l.split_whitespace().nth(1));
    let kib = kib.ok_or("no VmRSS")?;
    kib.parse().ctx("VmRSS")
}

/// CPU seconds (user + system) process `pid` has used so far, its exited threads included
/// (`/proc/<pid>/stat`, in clock ticks).
pub(crate) fn cpu_seconds(pid: u32) -> Res<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ctx("reading /proc stat")?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or("no ')' in stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; `rest` starts at field 3.
    let ticks = |i: usize| {
        f.get(i - 3)
            .ok_or("short stat")
            .and_then(|v| v.parse::<f64>().map_err(|_| "stat field"))
    };
    let per_s = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK);
    let per_s = per_s.ctx("sysconf(CLK_TCK)")?.ok_or("no CLK_TCK")? as f64;
    Ok((ticks(14)? + ticks(15)?) / per_s)
}

/// Context switches (voluntary and involuntary) of process `pid`'s live threads.
pub(crate) fn switches(pid: u32) -> Res<u64> {
    let mut n = 0;
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).ctx("reading /proc tasks")?;
    for t in tasks {
        // A thread that ended since the listing is skipped.
        let Ok(status) = fs::read_to_string(t.ctx("task")?.path().join("status")) else {
            continue;
        };
        for l in status.lines() {
            if l.starts_with("voluntary_ctxt_switches:")
                || l.starts_with("nonvoluntary_ctxt_switches:")
            {
                let v = l.split_whitespace().nth(1).ok_or("no count in status")?;
                n += v.parse::<u64>().ctx("a switch count in status")?;
            }
        }
    }
    Ok(n)
}

/// This process's CPU seconds and context switches so far, its exited threads included.
pub(crate) fn own_usage() -> Res<(f64, u64)> {
    usage(nix::sys::resource::UsageWho::RUSAGE_SELF)
}

/// CPU seconds and thread switches so far of this process or this thread (`who`).
pub(crate) fn usage(who: nix::sys::resource::UsageWho) -> Res<(f64, u64)> {
    let u = nix::sys::resource::getrusage(who).ctx("getrusage")?;
    let s = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    let cpu = s(u.user_time()) + s(u.system_time());
    let switches = u.voluntary_context_switches() + u.involuntary_context_switches();
    Ok((cpu, switches as u64))
}
