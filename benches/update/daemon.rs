//! The daemon measurements: GET and PATCH latencies, PATCH throughput, RSS, GETs under the
//! slow-client attack, and the background worker's lag from its status lines.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{mpsc, Barrier};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::client::{start_daemon, tls_conn, unix_conn, Conn, Daemon};
use crate::token::{bulk_kid, cpu_seconds, ec_kid, own_usage, switches, CpuTicks};
use crate::{pct, secs, warm_sample, Ctx, Figures, Opts, Res};

/// Issue #17: "with 500 slow connections open, normal p99 stays under 50 ms on the other
/// front door and under 200 ms on the same one".
const SLOW_CONNS: usize = 500;
const ROLES: [&str; 2] = ["ops", "payments"];

/// Mints a bearer token over the Unix socket.
pub(crate) fn mint(c: &mut Conn<UnixStream>) -> Res<String> {
    let body = json!({"scopes": ["keymgmt:list", "keymgmt:get", "keymgmt:upd"], "ttl_s": 3600});
    let v = c.ok("POST", "/v1/auth/token", &body.to_string())?;
    let token = v["token"].as_str().map(String::from);
    token.ok_or(format!("no token in {v}"))
}

type Body = fn(usize) -> Value;

fn label(n: usize) -> Value {
    json!({"label": format!("bench-{}", n % 2)})
}

/// Labels no other key of the bench's is given, so `keys.unique_labels` never refuses one.
fn unique_label(n: usize) -> Value {
    json!({"label": format!("bench-unique-{}", n % 2)})
}

fn descr(n: usize) -> Value {
    json!({"description": format!("bench description {}", n % 2)})
}

fn roles(n: usize) -> Value {
    json!({"roles": [ROLES[n % 2]]})
}

fn both(n: usize) -> Value {
    json!({"label": format!("bench-ld-{}", n % 2), "description": format!("ld {}", n % 2)})
}

/// PATCH p50 (ms) on one key and how many PATCHes that took (warm-up included);
/// `body(n)` alternates between two values.
fn patch_p50<S: Read + Write>(
    o: &Opts,
    c: &mut Conn<S>,
    kid: &str,
    body: Body,
) -> Res<(f64, usize)> {
    let lat = warm_sample(o.seconds, |n| c.patch(kid, &body(n)))?;
    Ok((pct(&lat, 50.0), lat.len() + 3))
}

/// The daemon's own count of what hash-chaining audit entries has cost: (entries, µs).
fn chain_cost<S: Read + Write>(c: &mut Conn<S>) -> Res<(f64, f64)> {
    let st = c.ok("GET", "/v1/status", "")?;
    let n = |k: &str| {
        st["audit"][k]
            .as_f64()
            .ok_or(format!("status has no audit.{k}: {st}"))
    };
    Ok((n("chained_entries")?, n("chain_us")?))
}

fn get_lat<S: Read + Write>(seconds: f64, c: &mut Conn<S>, path: &str) -> Res<Vec<Duration>> {
    warm_sample(seconds, |_| c.ok("GET", path, "").map(drop))
}

pub(crate) fn daemon_figures(
    o: &Opts,
    dir: &Path,
    conf: &Path,
    pin: &Path,
    figs: &mut Figures,
) -> Res<()> {
    // The first start on this token copy creates hsmkeyd's own objects (both signing
    // pairs, the audit marks); a restart, what operators do, finds them in its one scan.
    let (first, first_ms) = start_daemon(dir, conf, pin)?;
    figs.add("first_start_to_ready", first_ms, "ms");
    let (status, _) = first.stop()?;
    if !status.success() {
        return Err(format!(
            "the first daemon exited with {status} after SIGTERM"
        ));
    }
    let (d, ready_ms) = start_daemon(dir, conf, pin)?;
    figs.add("start_to_ready", ready_ms, "ms");

    let mut unix = unix_conn(&d.sock)?;
    let get_path = format!("/v1/keys/{}", bulk_kid(5));
    let get = get_lat(o.seconds, &mut unix, &get_path)?;
    figs.add("get_unix_p50", pct(&get, 50.0), "ms");
    figs.add("get_unix_p99", pct(&get, 99.0), "ms");
    // The state the raw RSS process is in: the token opened and scanned, reads served, no
    // write yet.
    figs.add("daemon_rss_ready", d.rss_mib()?, "MiB");
    let cases: [(&str, String, Body); 5] = [
        ("patch_label_secret_unix", bulk_kid(0), label),
        ("patch_label_pair_unix", ec_kid(0), label),
        ("patch_description_unix", bulk_kid(1), descr),
        ("patch_roles_unix", bulk_kid(2), roles),
        ("patch_label_description_unix", bulk_kid(3), both),
    ];
    let (entries_before, us_before) = chain_cost(&mut unix)?;
    let mut patches = 0;
    for (name, kid, body) in cases {
        let (p50, n) = patch_p50(o, &mut unix, &kid, body)?;
        figs.add(name, p50, "ms");
        patches += n;
    }
    // What the audit chain added to each of those PATCHes (two entries each: intent and
    // result), compared with the cheapest PATCH's p50; the signatures are off this path.
    let (entries_after, us_after) = chain_cost(&mut unix)?;
    figs.add(
        "audit_chain_per_patch",
        (us_after - us_before) / 1000.0 / patches as f64,
        "ms",
    );
    figs.add(
        "audit_entries_per_patch",
        (entries_after - entries_before) / patches as f64,
        "entries",
    );
    // The label PATCH again with `keys.unique_labels` on (SIGHUP), where each rename first
    // looks its new label up among every key's; then off again, as the rest expects.
    d.set_unique_labels(true)?;
    let (p50, _) = patch_p50(o, &mut unix, &bulk_kid(7), unique_label)?;
    figs.add("patch_label_unique_unix", p50, "ms");
    d.set_unique_labels(false)?;

    let bearer = mint(&mut unix)?;
    let mut https = tls_conn(&d, &bearer)?;
    let get = get_lat(o.seconds, &mut https, &get_path)?;
    figs.add("get_https_p50", pct(&get, 50.0), "ms");
    figs.add("get_https_p99", pct(&get, 99.0), "ms");
    let answer = crate::transport::recorded_answer(&d.sock, &get_path)?;
    crate::transport::transport_figures(o, dir, &get_path, &bearer, answer, figs)?;
    let (v, _) = patch_p50(o, &mut https, &bulk_kid(4), label)?;
    figs.add("patch_label_secret_https", v, "ms");
    doors_interleaved(o, &mut unix, &mut https, &get_path, figs)?;
    drop(https);

    // Memory per committed update: RSS across the throughput runs (after the warm-up of
    // the latency runs), over the updates they made.
    let rss_before_load = d.rss_mib()?;
    let mut updates = 0.0;
    for clients in [1, 2, 4, 16] {
        let kids: Vec<String> = (0..clients).map(|i| bulk_kid(10 + i)).collect();
        let probe = || {
            let at = Instant::now();
            Ok((at, cpu_seconds(d.pid())?, switches(d.pid())?, own_usage()?))
        };
        let (rate, (t0, cpu0, switches0, own0), (t1, cpu1, switches1, own1)) =
            throughput_probed(&d.sock, &kids, o.seconds, probe)?;
        let elapsed = (t1 - t0).as_secs_f64();
        let n = (rate * o.seconds).max(1.0);
        updates += n;
        figs.add(&format!("throughput_{clients}"), rate, "updates/s");
        // Where the 4 clients' updates go: the daemon's CPU per update against the raw
        // set's, the cores daemon and clients keep busy, the daemon's thread switches.
        if clients == 4 {
            // Updates were made, so a reading that did not move is a broken reading.
            if cpu1 <= cpu0 || switches1 <= switches0 || own1.0 <= own0.0 {
                return Err(
                    "the CPU or switch counts did not move over 4 clients' updates \
                     (/proc/<pid>/stat, /proc/<pid>/task/*/status, getrusage)"
                        .into(),
                );
            }
            figs.add("daemon_cpu_per_update_4", (cpu1 - cpu0) * 1000.0 / n, "ms");
            figs.add("daemon_cores_4", (cpu1 - cpu0) / elapsed, "cores");
            figs.add("client_cores_4", (own1.0 - own0.0) / elapsed, "cores");
            let per_update = switches1.saturating_sub(switches0) as f64 / n;
            figs.add("daemon_switches_per_update_4", per_update, "switches");
        }
    }
    let rate = throughput(&d.sock, &vec![bulk_kid(30); 4], o.seconds)?;
    updates += rate * o.seconds;
    figs.add("throughput_4_one_key", rate, "updates/s");
    let load_end = Instant::now();

    let rss = d.rss_mib()?;
    figs.add("daemon_rss", rss, "MiB");
    figs.add("daemon_rss_over_raw", rss - figs.value("raw_rss"), "MiB");
    // Of that, what hsmkeyd's own code holds (the rest is the module's, the code's pages
    // and the threads').
    let status = unix_conn(&d.sock)?.ok("GET", "/v1/status", "")?;
    let heap = status["memory"]["heap_bytes"].as_f64();
    let heap = heap.ok_or("no memory.heap_bytes in GET /v1/status")?;
    figs.add("daemon_heap", heap / (1024.0 * 1024.0), "MiB");
    let growth = (rss - rss_before_load) * 1024.0 * 1024.0 / updates.max(1.0);
    figs.add("rss_growth_per_update", growth, "bytes");

    slow_attack(o, &d, &bearer, &get_path, figs)?;
    // Usually known by now: the slow part takes longer than the worker needs.
    let catch_up = d.notify.catch_up_ms(load_end)?;
    drop(unix);
    let (status, heard) = d.stop()?;
    if !status.success() {
        eprintln!("note: the daemon exited with {status} after SIGTERM");
    }
    let (objects, records) = heard.backlog_max()?;
    figs.add("worker_backlog_max_objects", objects as f64, "objects");
    figs.add("worker_backlog_max_records", records as f64, "records");
    figs.add("worker_catch_up_ms", catch_up, "ms");
    Ok(())
}

/// The same GET, and the same key's label PATCH, over both front doors in turns (which
/// door goes first alternates), so both doors' figures come from the same minutes of a
/// machine whose speed drifts: `{get,patch}_{unix,https}_interleaved_p50`.
fn doors_interleaved(
    o: &Opts,
    unix: &mut Conn<UnixStream>,
    https: &mut Conn<crate::client::TlsStream>,
    get_path: &str,
    figs: &mut Figures,
) -> Res<()> {
    let kid = bulk_kid(8);
    let mut get = |_: usize, tls: bool| match tls {
        true => https.ok("GET", get_path, "").map(drop),
        false => unix.ok("GET", get_path, "").map(drop),
    };
    let (g_unix, g_tls) = in_turns(o.seconds, &mut get)?;
    let mut patch = |n: usize, tls: bool| match tls {
        true => https.patch(&kid, &label(n)),
        false => unix.patch(&kid, &label(n)),
    };
    let (p_unix, p_tls) = in_turns(o.seconds, &mut patch)?;
    for (name, lat) in [
        ("get_unix_interleaved_p50", g_unix),
        ("get_https_interleaved_p50", g_tls),
        ("patch_unix_interleaved_p50", p_unix),
        ("patch_https_interleaved_p50", p_tls),
    ] {
        figs.add(name, pct(&lat, 50.0), "ms");
    }
    Ok(())
}

/// `step(n, tls)` in turns on both doors for `seconds` after 3 warm-up turns; the sorted
/// latencies of the Unix and the TLS steps. Each request's `n` is its own count, so a
/// PATCH body alternates on every call and always changes the label.
fn in_turns(
    seconds: f64,
    step: &mut dyn FnMut(usize, bool) -> Res<()>,
) -> Res<(Vec<Duration>, Vec<Duration>)> {
    let (mut unix, mut tls, mut n) = (Vec::new(), Vec::new(), 0);
    let end = Instant::now() + secs(seconds);
    for turn in 0.. {
        if turn >= 3 && (Instant::now() >= end && unix.len() >= 5) {
            break;
        }
        for first_tls in [turn % 2 == 1, turn % 2 == 0] {
            let t0 = Instant::now();
            step(n, first_tls)?;
            n += 1;
            if turn >= 3 {
                match first_tls {
                    true => tls.push(t0.elapsed()),
                    false => unix.push(t0.elapsed()),
                }
            }
        }
    }
    unix.sort();
    tls.sort();
    Ok((unix, tls))
}

/// The throughput figures again, in rounds that take turns with their floors on the same
/// token: raw 2-thread sets, then the bare server ([`crate::bare`]) for 4 and 16 clients,
/// then a daemon started for 4 and 16 clients and stopped. The machine's speed drifts by
/// more than the effect measured (other guests share its cores), so the separate phases'
/// ratio says more about when each ran than about the daemon; here each daemon figure is
/// the median of `o.reps` rounds and so is each floor, the median of each round's own
/// ratios is reported (the medians of the rates alone may come from different rounds),
/// and the worst round's ratio beside it. Each round's steal time (the cores' time the
/// hypervisor gave to other guests) is measured too: rounds in which it stayed under
/// [`QUIET_STEAL_PCT`] in every part give the `_quiet_median_ratio`s, the figures least
/// touched by other guests.
pub(crate) fn paired_throughput(
    o: &Opts,
    dir: &Path,
    conf: &Path,
    pin: &Path,
    figs: &mut Figures,
) -> Res<()> {
    let kids = |clients: u32| -> Vec<String> { (0..clients).map(|i| bulk_kid(10 + i)).collect() };
    let mut raw = Vec::new();
    let (mut bare4, mut bare16, mut four, mut sixteen) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut bare_cpu, mut bare_switches) = (Vec::new(), Vec::new());
    let mut steal = Vec::new();
    let (mut starts, mut raw_starts) = (Vec::new(), Vec::new());
    for round in 1..=o.reps {
        let at = CpuTicks::now()?;
        raw.push(crate::token::raw_two_threads(pin, o.seconds)?.rate);
        let raw_steal = at.steal_pct_since()?;
        let at = CpuTicks::now()?;
        for (clients, rates) in [(4, &mut bare4), (16, &mut bare16)] {
            let bare = crate::bare::bare_throughput(pin, dir, &kids(clients), o.seconds)?;
            rates.push(bare.rate);
            if clients == 4 {
                bare_cpu.push(bare.cpu_per_update_ms);
                bare_switches.push(bare.switches_per_update);
            }
        }
        let bare_steal = at.steal_pct_since()?;
        // A restart and its raw work, one right after the other.
        raw_starts.push(crate::token::raw_start(pin)?.as_secs_f64() * 1000.0);
        let (d, ready_ms) = start_daemon(dir, conf, pin)?;
        starts.push(ready_ms);
        let at = CpuTicks::now()?;
        for (clients, rates) in [(4, &mut four), (16, &mut sixteen)] {
            rates.push(throughput(&d.sock, &kids(clients), o.seconds)?);
        }
        let daemon_steal = at.steal_pct_since()?;
        let (status, _) = d.stop()?;
        if !status.success() {
            return Err(format!(
                "a paired-round daemon exited with {status} after SIGTERM"
            ));
        }
        let i = round - 1;
        let (r, b4, b16, f, s) = (raw[i], bare4[i], bare16[i], four[i], sixteen[i]);
        eprintln!(
            "paired round {round}: raw {r:.0} sets/s (steal {raw_steal:.1}%), \
             bare server 4 clients {b4:.0} ({:.2}x), 16 clients {b16:.0} ({:.2}x) \
             (steal {bare_steal:.1}%), daemon 4 clients {f:.0} ({:.2}x, {:.2}x bare), \
             16 clients {s:.0} ({:.2}x, {:.2}x bare) (steal {daemon_steal:.1}%)",
            b4 / r,
            b16 / r,
            f / r,
            f / b4,
            s / r,
            s / b16
        );
        steal.push(raw_steal.max(bare_steal).max(daemon_steal));
    }
    // Each round's rate over that round's floor.
    let ratios = |rates: &[f64], floor: &[f64]| -> Vec<f64> {
        rates.iter().zip(floor).map(|(d, r)| d / r).collect()
    };
    let worst = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let quiet = |v: &[f64]| -> Vec<f64> {
        let rounds = v.iter().zip(&steal);
        rounds
            .filter(|(_, s)| **s < QUIET_STEAL_PCT)
            .map(|(r, _)| *r)
            .collect()
    };
    let (r4, r16) = (ratios(&four, &raw), ratios(&sixteen, &raw));
    let (q4, q16) = (quiet(&r4), quiet(&r16));
    figs.add("throughput_4_paired_worst_ratio", worst(&r4), "x");
    figs.add("throughput_16_paired_worst_ratio", worst(&r16), "x");
    figs.add("throughput_4_paired_median_ratio", median(r4), "x");
    figs.add("throughput_16_paired_median_ratio", median(r16), "x");
    // The bare server against the raw sets: the most any daemon could reach here.
    figs.add(
        "bare_4_paired_median_ratio",
        median(ratios(&bare4, &raw)),
        "x",
    );
    figs.add(
        "bare_16_paired_median_ratio",
        median(ratios(&bare16, &raw)),
        "x",
    );
    // The daemon against the bare server: what hsmkeyd itself costs.
    let over_bare4 = median(ratios(&four, &bare4));
    let over_bare16 = median(ratios(&sixteen, &bare16));
    figs.add(
        "throughput_4_paired_over_bare_median_ratio",
        over_bare4,
        "x",
    );
    figs.add(
        "throughput_16_paired_over_bare_median_ratio",
        over_bare16,
        "x",
    );
    figs.add("paired_rounds_quiet", q4.len() as f64, "rounds");
    figs.add(
        "paired_steal_max",
        steal.iter().copied().fold(0.0, f64::max),
        "%",
    );
    figs.add("throughput_4_paired_quiet_median_ratio", median(q4), "x");
    figs.add("throughput_16_paired_quiet_median_ratio", median(q16), "x");
    figs.add("raw_set_2threads_paired", median(raw), "sets/s");
    figs.add("throughput_4_bare_paired", median(bare4), "updates/s");
    // What the bare server's connection threads spent per update at 4 clients, against
    // the raw set's and the daemon's (`daemon_cpu_per_update_4`, `_switches_`).
    figs.add("bare_cpu_per_update_4", median(bare_cpu), "ms");
    figs.add(
        "bare_switches_per_update_4",
        median(bare_switches),
        "switches",
    );
    figs.add("throughput_16_bare_paired", median(bare16), "updates/s");
    // Each round's restart against the raw start just before it.
    figs.add(
        "start_to_ready_paired_median_ratio",
        median(ratios(&starts, &raw_starts)),
        "x",
    );
    figs.add("raw_start_paired", median(raw_starts), "ms");
    figs.add("start_to_ready_paired", median(starts), "ms");
    figs.add("throughput_4_paired", median(four), "updates/s");
    figs.add("throughput_16_paired", median(sixteen), "updates/s");
    Ok(())
}

/// Steal time under which a paired round counts as quiet, in % of the machine's CPU time.
/// Not zero: with both cores busy, the calmest rounds on the 2-core VM showed 1 to 3%.
const QUIET_STEAL_PCT: f64 = 3.0;

/// The median: the middle value, or the mean of the two middle ones; NaN (`null` in the
/// JSON) for none.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Label PATCHes/s from one thread per kid, each on its own keep-alive connection.
pub(crate) fn throughput(sock: &Path, kids: &[String], seconds: f64) -> Res<f64> {
    throughput_probed(sock, kids, seconds, || Ok(())).map(|(rate, ..)| rate)
}

/// [`throughput`], with `probe` read once the clients are connected and warm, just before
/// they start, and again when they are done but still connected (the daemon may serve a
/// connection on a thread that ends with it, and its switch counts with the thread).
fn throughput_probed<T>(
    sock: &Path,
    kids: &[String],
    seconds: f64,
    probe: impl Fn() -> Res<T>,
) -> Res<(f64, T, T)> {
    static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (ready, go) = (Barrier::new(kids.len() + 1), Barrier::new(kids.len() + 1));
    std::thread::scope(|scope| {
        let mut workers = Vec::new();
        for (i, kid) in kids.iter().enumerate() {
            let (ready, go) = (&ready, &go);
            workers.push(
                scope.spawn(move || -> Res<(u64, Instant, Conn<UnixStream>)> {
                    // Labels only this thread writes, alternating: every PATCH changes something.
                    let label = |n: u64| json!({"label": format!("tp{run}-{i}-{}", n % 2)});
                    let conn = unix_conn(sock);
                    let warm = conn.and_then(|mut c| c.patch(kid, &label(1)).map(|()| c));
                    // Both waits even after an error, so that nobody waits forever.
                    ready.wait();
                    go.wait();
                    let (mut c, end, mut n) = (warm?, Instant::now() + secs(seconds), 0);
                    while Instant::now() < end {
                        c.patch(kid, &label(n))?;
                        n += 1;
                    }
                    Ok((n, Instant::now(), c))
                }),
            );
        }
        ready.wait();
        let before = probe();
        go.wait();
        let t0 = Instant::now();
        let (mut total, mut last, mut conns) = (0, t0, Vec::new());
        let mut failed = None;
        for w in workers {
            match w.join().expect("client thread") {
                Ok((n, done, c)) => {
                    (total, last) = (total + n, last.max(done));
                    conns.push(c);
                }
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        let after = probe()?;
        drop(conns);
        Ok((total as f64 / (last - t0).as_secs_f64(), before?, after))
    })
}

/// GET latency over a fresh connection on each front door while 500 clients hold a PATCH
/// whose body never comes (their body deadline is 30 s, so each door gets at most 12 s).
fn slow_attack(o: &Opts, d: &Daemon, bearer: &str, path: &str, figs: &mut Figures) -> Res<()> {
    let (ready_tx, ready_rx) = mpsc::channel::<Res<()>>();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let sock = d.sock.clone();
    let head = format!(
        "PATCH /v1/keys/{} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: 1000\r\n\r\n",
        bulk_kid(6)
    );
    let holder = std::thread::spawn(move || {
        let open = |_| {
            UnixStream::connect(&sock).and_then(|mut s| s.write_all(head.as_bytes()).map(|()| s))
        };
        let conns: std::io::Result<Vec<UnixStream>> = (0..SLOW_CONNS).map(open).collect();
        let (conns, ready) = match conns {
            Ok(conns) => (conns, Ok(())),
            Err(e) => (Vec::new(), Err(format!("opening a slow connection: {e}"))),
        };
        let _ = ready_tx.send(ready);
        let _ = stop_rx.recv();
        conns.iter().filter(|s| still_waiting(s)).count()
    });
    ready_rx.recv().ctx("slow connection thread")??;
    std::thread::sleep(Duration::from_millis(200)); // let the daemon accept them all
    let seconds = o.seconds.min(12.0);
    let h = get_lat(seconds, &mut tls_conn(d, bearer)?, path)?;
    let u = get_lat(seconds, &mut unix_conn(&d.sock)?, path)?;
    let rss = d.rss_mib()?;
    let _ = stop_tx.send(());
    let held = holder.join().expect("slow connection thread");
    figs.add("slow_attack_get_https_p50", pct(&h, 50.0), "ms");
    figs.add("slow_attack_get_https_p99", pct(&h, 99.0), "ms");
    figs.add("slow_attack_get_unix_p50", pct(&u, 50.0), "ms");
    figs.add("slow_attack_get_unix_p99", pct(&u, 99.0), "ms");
    figs.add("slow_attack_conns_held", held as f64, "conns");
    figs.add("slow_attack_daemon_rss", rss, "MiB");
    Ok(())
}

/// Whether the daemon has neither answered (503, 408) nor closed this connection.
fn still_waiting(mut s: &UnixStream) -> bool {
    let mut byte = [0u8; 1];
    s.set_nonblocking(true).is_ok()
        && matches!(s.read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}
