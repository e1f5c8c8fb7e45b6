//! Update benchmark: what an hsmkeyd update costs next to the raw PKCS#11 calls it makes.
//!
//! Run with `cargo bench --bench update` (flags after `--`: `--keys N`, default 10000;
//! `--seconds S` per measurement, default 3; `--quick` = 100 keys, 0.5 s, one repetition,
//! for CI). Needs SoftHSM2 (`./softhsm-setup.sh --deps-only`).
//!
//! The token (N AES-256 keys plus 64 EC P-256 pairs) is built once and cached under
//! `target/bench/token-<N>/`; every run works on a fresh copy of it. One run measures:
//!
//! 1. the raw floor, with cryptoki in this process (and one re-executed child for its RSS):
//!    C_SetAttributeValue(CKA_LABEL) on a secret key and on both objects of a pair, label
//!    sets/s from two threads (with their CPU per set, the cores they kept busy and this
//!    process's thread switches per set, from `getrusage`), and initialize + login + one
//!    full scan;
//! 2. the real daemon on the same token copy (after the raw part has finalized: SoftHSM file
//!    tokens take one writing process at a time): start until READY=1 (sd_notify), once
//!    on the fresh copy (`first_start_to_ready`: hsmkeyd creates its signing keys and audit
//!    marks) and again as a restart (`start_to_ready`, compared with the raw start), GET
//!    and PATCH latencies over one keep-alive connection on the Unix socket and over
//!    HTTPS (and both again in turns, request by request on the same GET and the same
//!    key's label PATCH: `{get,patch}_{unix,https}_interleaved_p50`, the doors compared
//!    over the same minutes), the transport floor of that GET (`transport.rs`: the same bytes answered by a
//!    bare server in this process over a Unix socket, over plain loopback TCP and over TLS, and `https_floor_p50`,
//!    the Unix GET plus what TLS on loopback TCP adds to it), what hash-chaining the audit entries added to each of those PATCHes
//!    (`audit_chain_per_patch`, from the daemon's own count in `GET /v1/status`, compared
//!    with the label PATCH's p50; `audit_entries_per_patch`), PATCH throughput from 1..16
//!    clients (for 4 clients also the daemon's CPU per update against the raw set's, the
//!    cores the daemon and this process's clients kept busy, and the daemon's thread
//!    switches per update against the raw set's: `/proc/<pid>/stat` and the live threads'
//!    `status`), its RSS once it serves (`daemon_rss_ready`: opened, scanned, GETs answered,
//!    nothing written, the raw RSS process's state) and after the throughput runs (before
//!    the slow clients; `daemon_heap`, the part of it hsmkeyd's own code holds) and
//!    how much it grew per update over the throughput runs (`rss_growth_per_update`), and
//!    GET latency on both front doors while 500 slow clients hold stalled PATCH bodies on
//!    the Unix socket (at most 12 s per door: the stalled bodies time out after 30 s).
//!    One config serves throughout, with the connection limits the slow part needs;
//! 3. the daemon's background-worker lag, from the `STATUS=` lines it sends on our
//!    NOTIFY_SOCKET, read for the whole run: `worker_backlog_max_objects` and
//!    `worker_backlog_max_records`, the largest `cleanup backlog N objects, M records` seen
//!    (superseded metadata objects not destroyed yet; keys whose token record lags the
//!    index), and `worker_catch_up_ms`, from the end of the last throughput measurement
//!    until a status line without a backlog arrives (-1: none within 10 s; 0: the last
//!    line before the end had none and no line with one followed within 2 s, for a daemon
//!    that sends its status only when it changes). These have no floor;
//! 4. the throughput figures again in 5 rounds (1 with `--quick`) that take turns
//!    with their floors on the same token copy: the raw 2-thread sets, then the bare server
//!    (`bare.rs`: a blocking thread per connection that sets the label a PATCH asks for and
//!    answers a fixed 200, the server floor any daemon would start from) for 4 and 16
//!    clients, then a daemon started for 4 and 16 clients and stopped
//!    (`daemon::paired_throughput`). `throughput_4_paired` and `throughput_16_paired` (and
//!    the bare server's `throughput_{4,16}_bare_paired`) are the medians of the rounds,
//!    compared with the median raw rate (`raw_set_2threads_paired`); beside them each
//!    round's ratio to its own raw rate, the median (`_paired_median_ratio`, the figure to
//!    read; `bare_{4,16}_paired_median_ratio` for the bare server) and the worst, and each
//!    round's daemon rate over its bare server's (`_paired_over_bare_median_ratio`: what
//!    hsmkeyd itself costs), and what the bare server's connection threads spent per
//!    update at 4 clients (`bare_cpu_per_update_4`, `bare_switches_per_update_4`, from
//!    `getrusage(RUSAGE_THREAD)`, beside the daemon's figures of the first phase): the
//!    machine's speed drifts between phases by more than the effect measured, and the two
//!    medians may come from different rounds. Each round's steal time (from `/proc/stat`:
//!    the time the hypervisor gave this machine's cores to other guests) is printed with
//!    it; `paired_steal_max` is the largest, `paired_rounds_quiet` counts the rounds under
//!    3% in both halves, and `_paired_quiet_median_ratio` is the median ratio of those
//!    (NaN, `null` in the JSON, when there are none). Each round's daemon start is a
//!    restart timed against the raw start (initialize + login + scan) made right before
//!    it: `start_to_ready_paired` and `raw_start_paired` are the medians,
//!    `start_to_ready_paired_median_ratio` the median of the rounds' ratios, the figure
//!    to read beside phase 2's single `start_to_ready`;
//!
//! 5. instructions per update, counted by callgrind (`instructions.rs`; skipped without
//!    valgrind): a raw label set in a re-executed child (`raw_instructions_per_set`) and a
//!    label PATCH of a daemon run under callgrind (`daemon_instructions_per_patch`), each
//!    the whole process's user-space instructions over 300 of them (100 with `--quick`)
//!    after as many to warm up; `daemon_own_instructions_per_patch` is the difference,
//!    what hsmkeyd adds to the token's work, and `daemon_sha256_instructions_per_patch`
//!    the part of it in SHA-256, which valgrind runs without the CPU's SHA instructions
//!    (`..._less_sha256` leaves it out); and a `GET /v1/keys/{kid}` of that daemon on the
//!    Unix socket and over HTTPS (`daemon_instructions_per_get_{unix,https}`, with
//!    `daemon_sha256_instructions_per_get_https`, the bearer token's cache key). Unlike
//!    the times, these do not move with the machine's load: the yardstick for changes to
//!    the request path's CPU.
//!
//! `run_steal` is the steal time over the whole run.
//!
//! It prints one table (figure | value | raw floor | ratio = value / floor; [`FLOORS`]
//! says which figure is compared to which) and writes it as JSON to
//! `target/bench/update.json`. Timings are reported, never judged: the bench fails (exit 1,
//! with the reason) only when something does not work, such as a daemon that does not
//! start or an answer other than 200.

mod bare;
mod client;
mod daemon;
mod instructions;
mod memory;
mod notify;
mod token;
mod transport;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

type Res<T> = Result<T, String>;

trait Ctx<T> {
    fn ctx(self, what: impl std::fmt::Display) -> Res<T>;
}

impl<T, E: std::fmt::Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: impl std::fmt::Display) -> Res<T> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

struct Opts {
    keys: u32,
    seconds: f64,
    reps: usize,
}

/// One reported number, with the figure it is compared to (`ratio` = value / floor).
struct Figure {
    name: String,
    value: f64,
    unit: &'static str,
    floor: Option<(String, f64)>,
}

#[derive(Default)]
struct Figures(Vec<Figure>);

impl Figures {
    fn value(&self, name: &str) -> f64 {
        self.0
            .iter()
            .find(|f| f.name == name)
            .map_or(f64::NAN, |f| f.value)
    }

    /// Adds a figure, with its floor from [`FLOORS`].
    fn add(&mut self, name: &str, value: f64, unit: &'static str) {
        let floor = FLOORS.iter().find(|(n, ..)| *n == name);
        let label = |f: &str, k: f64| {
            if k == 1.0 {
                f.into()
            } else {
                format!("{k} x {f}")
            }
        };
        let floor = floor.map(|(_, f, k)| (label(f, *k), k * self.value(f)));
        let name = name.to_string();
        self.0.push(Figure {
            name,
            value,
            unit,
            floor,
        });
    }
}

/// figure -> (floor figure, factor): what a figure is compared to.
const FLOORS: &[(&str, &str, f64)] = &[
    ("start_to_ready", "raw_start", 1.0),
    ("start_to_ready_paired", "raw_start_paired", 1.0),
    ("get_https_interleaved_p50", "get_unix_interleaved_p50", 1.0),
    (
        "patch_https_interleaved_p50",
        "patch_unix_interleaved_p50",
        1.0,
    ),
    ("patch_label_secret_unix", "raw_set_label_secret", 1.0),
    ("patch_label_pair_unix", "raw_set_label_pair", 1.0),
    ("patch_description_unix", "raw_set_label_secret", 1.0),
    ("patch_roles_unix", "raw_set_label_secret", 1.0),
    ("patch_label_description_unix", "raw_set_label_secret", 2.0),
    ("patch_label_unique_unix", "raw_set_label_secret", 1.0),
    ("audit_chain_per_patch", "patch_label_secret_unix", 1.0),
    ("get_https_p50", "get_unix_p50", 1.0),
    ("get_https_p99", "get_unix_p99", 1.0),
    ("transport_tcp_p50", "transport_unix_p50", 1.0),
    ("transport_tls_p50", "transport_unix_p50", 1.0),
    ("https_floor_p50", "get_unix_p50", 1.0),
    ("patch_label_secret_https", "patch_label_secret_unix", 1.0),
    ("throughput_1", "raw_set_2threads", 1.0),
    ("throughput_2", "raw_set_2threads", 1.0),
    ("throughput_4", "raw_set_2threads", 1.0),
    ("throughput_16", "raw_set_2threads", 1.0),
    ("throughput_4_paired", "raw_set_2threads_paired", 1.0),
    ("throughput_16_paired", "raw_set_2threads_paired", 1.0),
    ("throughput_4_bare_paired", "raw_set_2threads_paired", 1.0),
    ("throughput_16_bare_paired", "raw_set_2threads_paired", 1.0),
    ("bare_cpu_per_update_4", "raw_cpu_per_set", 1.0),
    ("bare_switches_per_update_4", "raw_switches_per_set", 1.0),
    ("daemon_cpu_per_update_4", "raw_cpu_per_set", 1.0),
    ("daemon_switches_per_update_4", "raw_switches_per_set", 1.0),
    (
        "daemon_instructions_per_patch",
        "raw_instructions_per_set",
        1.0,
    ),
    (
        "daemon_own_instructions_per_patch",
        "raw_instructions_per_set",
        1.0,
    ),
    (
        "daemon_instructions_per_get_https",
        "daemon_instructions_per_get_unix",
        1.0,
    ),
    ("daemon_rss_ready", "raw_rss", 1.0),
    ("daemon_rss", "raw_rss", 1.0),
    ("daemon_heap", "daemon_rss", 1.0),
    (
        "mem_daemon_first_pass_per_1000",
        "mem_raw_first_pass_per_1000",
        1.0,
    ),
    (
        "mem_daemon_second_pass_per_1000",
        "mem_raw_second_pass_per_1000",
        1.0,
    ),
    ("mem_daemon_steady_per_1000", "mem_raw_steady_per_1000", 1.0),
    // Of the daemon's growth, the part that is its own heap.
    (
        "mem_daemon_heap_first_pass_per_1000",
        "mem_daemon_first_pass_per_1000",
        1.0,
    ),
    (
        "mem_daemon_heap_second_pass_per_1000",
        "mem_daemon_second_pass_per_1000",
        1.0,
    ),
    (
        "mem_daemon_heap_steady_per_1000",
        "mem_daemon_steady_per_1000",
        1.0,
    ),
];

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let result = match args.first().map(String::as_str) {
        Some("--raw-rss-child") if args.len() == 3 => token::raw_rss_child(&args[1], &args[2]),
        Some("--raw-memory-child") => memory::raw_memory_child(&args[1..]),
        Some("--raw-instructions-child") => instructions::raw_instructions_child(&args[1..]),
        _ => parse_opts(&args).and_then(|o| run(&o)),
    };
    if let Err(e) = result {
        eprintln!("bench update FAILED: {e}");
        std::process::exit(1);
    }
}

const USAGE: &str = "--keys N, --seconds S, --quick";

fn parse_opts(args: &[String]) -> Res<Opts> {
    let (mut keys, mut seconds, mut quick) = (None, None, false);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--keys" => keys = Some(value()?.parse::<u32>().ctx("--keys")?),
            "--seconds" => seconds = Some(value()?.parse::<f64>().ctx("--seconds")?),
            "--quick" => quick = true,
            _ => return Err(format!("unknown flag {a:?}: {USAGE}")),
        }
    }
    let keys = keys.unwrap_or(if quick { 100 } else { 10_000 });
    let seconds = seconds.unwrap_or(if quick { 0.5 } else { 3.0 });
    if keys < 64 || seconds <= 0.0 {
        return Err("need --keys >= 64 and --seconds > 0".into());
    }
    let reps = if quick { 1 } else { 5 };
    Ok(Opts {
        keys,
        seconds,
        reps,
    })
}

fn run(o: &Opts) -> Res<()> {
    let bench_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    fs::create_dir_all(&bench_dir).ctx("creating target/bench")?;
    let cached = token::cached_token(&bench_dir, o.keys)?;
    let work = tempfile::tempdir().ctx("tempdir")?;
    token::copy_dir(&cached, work.path())?;
    let conf = token::write_softhsm_conf(work.path())?;
    let pin = work.path().join("pin");
    // Only this thread runs yet; the raw part reads the variable, the daemon gets its own.
    std::env::set_var("SOFTHSM2_CONF", &conf);

    let mut figs = Figures::default();
    let start = token::CpuTicks::now()?;
    token::raw_floor(o, &pin, &mut figs)?;
    daemon::daemon_figures(o, work.path(), &conf, &pin, &mut figs)?;
    daemon::paired_throughput(o, work.path(), &conf, &pin, &mut figs)?;
    instructions::instruction_figures(o, work.path(), &conf, &pin, &mut figs)?;
    memory::memory_figures(o, &cached, &mut figs)?;
    // How much of the machine other guests took over the whole run: a run with much of it
    // measured the neighbours more than hsmkeyd.
    figs.add("run_steal", start.steal_pct_since()?, "%");
    report(o, &bench_dir, &figs)
}

// ---------------------------------------------------------------- measuring

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// Runs `f(n)` for `seconds` (at least 5 times); returns the sorted durations.
fn sample(seconds: f64, mut f: impl FnMut(usize) -> Res<()>) -> Res<Vec<Duration>> {
    let end = Instant::now() + secs(seconds);
    let mut out = Vec::new();
    while Instant::now() < end || out.len() < 5 {
        let t0 = Instant::now();
        f(out.len())?;
        out.push(t0.elapsed());
    }
    out.sort();
    Ok(out)
}

/// Three warm-up calls (`f(1)`..`f(3)`, so alternation goes on), then [`sample`].
fn warm_sample(seconds: f64, mut f: impl FnMut(usize) -> Res<()>) -> Res<Vec<Duration>> {
    (1..=3).try_for_each(&mut f)?;
    sample(seconds, f)
}

/// The p-th percentile of sorted durations, in ms.
fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p / 100.0).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------- report

fn machine() -> Value {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo.lines().find_map(|l| l.strip_prefix("model name"));
    let model = model.and_then(|r| r.split_once(':'));
    let model = model.map_or("?", |(_, m)| m.trim());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    json!({"nproc": nproc, "cpu": model, "kernel": kernel.trim()})
}

fn report(o: &Opts, bench_dir: &Path, figs: &Figures) -> Res<()> {
    let m = machine();
    let (cpu, kernel) = (m["cpu"].as_str(), m["kernel"].as_str());
    let (cpu, kernel) = (cpu.unwrap_or("?"), kernel.unwrap_or("?"));
    println!("\nmachine: nproc {}, {cpu}, kernel {kernel}", m["nproc"]);
    let per = format!("{} s per measurement", o.seconds);
    let (keys, pairs) = (o.keys, token::EC_PAIRS);
    println!("token: {keys} AES-256 keys + {pairs} EC P-256 pairs; {per}\n");
    let mut rows = vec![["figure", "value", "raw floor", "ratio"].map(String::from)];
    for f in &figs.0 {
        let value = format!("{:.3} {}", f.value, f.unit);
        let (floor, ratio) = match &f.floor {
            Some((n, v)) => (format!("{v:.3} ({n})"), format!("{:.2}", f.value / v)),
            None => (String::new(), String::new()),
        };
        rows.push([f.name.clone(), value, floor, ratio]);
    }
    let mut w = [0; 4];
    for (i, cell) in rows.iter().flatten().enumerate() {
        w[i % 4] = w[i % 4].max(cell.len());
    }
    for (n, [a, b, c, d]) in rows.iter().enumerate() {
        let (wa, wb, wc, wd) = (w[0], w[1], w[2], w[3]);
        println!("{a:<wa$} | {b:>wb$} | {c:>wc$} | {d:>wd$}");
        if n == 0 {
            println!("{}", w.map(|x| "-".repeat(x)).join("-|-"));
        }
    }
    let json_fig = |f: &Figure| {
        let (floor, floor_value) = f.floor.clone().unzip();
        let ratio = floor_value.map(|v| f.value / v);
        let (name, value, unit) = (&f.name, f.value, f.unit);
        json!({"name": name, "value": value, "unit": unit, "floor": floor,
               "floor_value": floor_value, "ratio": ratio})
    };
    let figures: Vec<Value> = figs.0.iter().map(json_fig).collect();
    let doc = json!({"machine": m, "keys": o.keys, "seconds": o.seconds, "figures": figures});
    let path = bench_dir.join("update.json");
    let text = serde_json::to_string_pretty(&doc).ctx("JSON")?;
    fs::write(&path, text).ctx("writing update.json")?;
    println!("\nwritten to {}", path.display());
    Ok(())
}
