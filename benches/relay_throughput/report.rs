//! The report: what the run measured (`Results`, with one `Round` per drain of the
//! backlog by each approach) as the markdown table, with the project's targets,
//! the ratios taken within each round, PASS/MISS, and the per-round and CPU tables.
//!
//! It only formats: nothing here talks to a server, so the targets and the wording
//! can change without touching how anything is measured.

use std::fmt::Write as _;
use std::time::Duration;

use crate::Args;
use crate::cpu::Cpu;
use crate::drain::Drain;
use crate::latency::Latency;
use crate::setup::{AGGREGATES, Machine, Payload};

/// Everything the run measures, for the report.
#[derive(Default, Debug)]
pub struct Results {
    pub load_before: String,
    pub payload_bytes: f64,
    pub insert_wal_per_event: f64,
    pub poll_insert_wal_per_event: f64,
    pub preload_secs: f64,
    pub first_ack_ms: f64,
    pub rounds: Vec<Round>,
    /// Of the last round's topics.
    pub relay_log_bytes: u64,
    pub poll_log_bytes: u64,
    pub lat: Latency,
    pub relay_rss_after_latency_kib: u64,
}

/// One drain of the backlog by each approach.
#[derive(Default, Debug, Clone)]
pub struct Round {
    pub recv: Drain,
    pub recv_file_bytes: u64,
    pub relay: Drain,
    pub relay_extra_wal: i64,
    pub relay_rss_kib: u64,
    pub relay_max_in_flight: i64,
    pub relay_first_ack: Option<f64>,
    pub poll: Drain,
    pub poll_extra_wal: i64,
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

fn ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_infinite() => "> 32.8 s".into(),
        Some(v) => format!("{v:.1} ms"),
        None => "n/a".into(),
    }
}

fn cpu_line(name: &str, d: &Drain, client: &str) -> String {
    // CPU milliseconds per 1000 events.
    let per_k = |s: f64| s * 1e6 / d.events.max(1) as f64;
    format!(
        "| {name} | {:.1} s | {client} {:.1} s | {:.1} s | {:.1} s | {:.1} s | {:.1} s | {:.1} ms |",
        d.secs,
        d.cpu.client,
        d.cpu.postgres,
        d.cpu.kafka,
        d.cpu.bench,
        d.cpu.other,
        per_k(d.cpu.client + d.cpu.postgres + d.cpu.kafka + d.cpu.bench),
    )
}

/// The middle value (the mean of the two middle ones for an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// `median (min–max)` of one figure over the rounds, or just the value for one round.
pub fn spread(v: &[f64], fmt: impl Fn(f64) -> String) -> String {
    let med = median(v.to_vec());
    if v.len() < 2 {
        return fmt(med);
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{} ({}–{})", fmt(med), fmt(lo), fmt(hi))
}

/// A drain whose every figure is the mean over the rounds, for the CPU table.
fn mean_drain(ds: &[&Drain]) -> Drain {
    let n = ds.len().max(1) as f64;
    let sum = |f: &dyn Fn(&Drain) -> f64| ds.iter().map(|d| f(d)).sum::<f64>() / n;
    Drain {
        secs: sum(&|d| d.secs),
        events: ds.first().map_or(0, |d| d.events),
        cpu: Cpu {
            postgres: sum(&|d| d.cpu.postgres),
            kafka: sum(&|d| d.cpu.kafka),
            bench: sum(&|d| d.cpu.bench),
            client: sum(&|d| d.cpu.client),
            other: sum(&|d| d.cpu.other),
        },
        steady: None,
    }
}

pub fn report(args: &Args, r: &Results, m: &Machine, total: Duration) -> String {
    let n = args.events as f64;
    let rounds = &r.rounds;
    let col = |f: &dyn Fn(&Round) -> f64| rounds.iter().map(f).collect::<Vec<f64>>();
    let rate = |v: f64| format!("{v:.0}/s");
    let times = |v: f64| format!("{v:.2}×");
    let relay = col(&|x| x.relay.rate());
    let recv = col(&|x| x.recv.rate());
    let poll = col(&|x| x.poll.rate());
    let steady = |d: &Drain| d.steady.map_or(f64::NAN, |s| s.1);
    let relay_steady = col(&|x| steady(&x.relay));
    let recv_steady = col(&|x| steady(&x.recv));
    let vs_recv = col(&|x| x.relay.rate() / x.recv.rate());
    let vs_recv_steady = col(&|x| steady(&x.relay) / steady(&x.recv));
    let vs_poll = col(&|x| x.relay.rate() / x.poll.rate());
    let relay_secs = col(&|x| x.relay.secs);
    let recv_secs = col(&|x| x.recv.secs);
    let poll_secs = col(&|x| x.poll.secs);
    // The worst round for the targets that must always hold.
    let relay_extra = col(&|x| x.relay_extra_wal as f64 / n).into_iter().fold(0.0, f64::max);
    let poll_extra = median(col(&|x| x.poll_extra_wal as f64 / n));
    let relay_extra_pct = 100.0 * relay_extra / r.insert_wal_per_event;
    let poll_extra_pct = 100.0 * poll_extra / r.insert_wal_per_event;
    let rss_drain = col(&|x| x.relay_rss_kib as f64 / 1024.0);
    let rss_lat = r.relay_rss_after_latency_kib as f64 / 1024.0;
    let rss_max = rss_drain.iter().copied().fold(rss_lat, f64::max);
    let l = &r.lat;
    let p99_worst = l.hist_p99_ms.unwrap_or(f64::INFINITY).max(l.e2e_p99_ms);
    let offered_rate = l.offered as f64 / l.offered_secs;

    let mut o = String::new();
    let _ = writeln!(o, "## Relay throughput benchmark\n");
    let _ = writeln!(
        o,
        "{} events of {:.0} bytes of JSON ({} payloads, {} aggregates, {} per transaction), topics of {} partitions; \
         PostgreSQL {}, Kafka {} (KRaft, one node), {} CPUs ({}), {:.0} GiB RAM, Linux {}. \
         PostgreSQL, Kafka, the worker and the bench share the CPUs. Load average before the run: {}. \
         Whole run {:.0} s{}.\n",
        args.events,
        r.payload_bytes,
        args.payload.name(),
        AGGREGATES,
        args.batch,
        args.partitions,
        m.postgres,
        m.kafka,
        m.cpus,
        m.cpu_model,
        m.mem_gib,
        m.kernel,
        r.load_before,
        total.as_secs_f64(),
        if std::env::var_os("OUTBOX_BENCH_WORKER").is_some_and(|v| !v.is_empty()) {
            "; worker binary taken from OUTBOX_BENCH_WORKER"
        } else {
            ""
        },
    );
    let _ = writeln!(
        o,
        "{} round(s), each draining the same backlog with each approach in turn; figures are the median \
         over the rounds with the range in brackets, and a ratio is taken within each round first.\n",
        rounds.len()
    );
    let _ = writeln!(o, "| Measure | Value | Target | Result |");
    let _ = writeln!(o, "| --- | --- | --- | --- |");
    let _ = writeln!(
        o,
        "| Relay drain (release worker, from its start until the slot confirms the last commit) | {} in {:.1} s | | |",
        spread(&relay, rate),
        median(relay_secs)
    );
    let _ = writeln!(
        o,
        "| pg_recvlogical drain (same WAL, to a file) | {} in {:.1} s | | |",
        spread(&recv, rate),
        median(recv_secs)
    );
    let _ = writeln!(
        o,
        "| Polling publisher drain ({} worker(s), batches of {}) | {} in {:.1} s | | |",
        args.polling_workers,
        args.batch,
        spread(&poll, rate),
        median(poll_secs)
    );
    let _ = writeln!(
        o,
        "| Relay / pg_recvlogical | {} | ≥ 0.8× | {} |",
        spread(&vs_recv, times),
        verdict(median(vs_recv.clone()) >= 0.8)
    );
    let _ = writeln!(
        o,
        "| Relay / polling publisher | {} | ≥ 2× | {} |",
        spread(&vs_poll, times),
        verdict(median(vs_poll.clone()) >= 2.0)
    );
    let _ = writeln!(
        o,
        "| Steady rates, 10–90 % of the backlog (start-up left out): relay / pg_recvlogical | {} / {} = {} | | |",
        spread(&relay_steady, rate),
        spread(&recv_steady, rate),
        spread(&vs_recv_steady, times)
    );
    let _ = writeln!(
        o,
        "| WAL per event, the outbox inserts alone | {:.0} bytes | | |",
        r.insert_wal_per_event
    );
    let _ = writeln!(
        o,
        "| Extra WAL per event, relay (during its drain, worst round) | {relay_extra:.2} bytes ({relay_extra_pct:.2} %) | ≤ 5 % | {} |",
        verdict(relay_extra_pct <= 5.0)
    );
    let _ = writeln!(
        o,
        "| Extra WAL per event, polling publisher (its `FOR UPDATE` row locks and `UPDATE … SET sent`) | {poll_extra:.0} bytes ({poll_extra_pct:.0} %) | | |"
    );
    let _ = writeln!(
        o,
        "| Commit→ack p50 / p99, worker histogram (interpolated in its buckets) | {} / {} | | |",
        ms(l.hist_p50_ms),
        ms(l.hist_p99_ms)
    );
    let _ = writeln!(
        o,
        "| Insert→broker append p50 / p99 / max, from Kafka's LogAppendTime (1 ms resolution) | {:.1} / {:.1} / {:.1} ms | | |",
        l.e2e_p50_ms, l.e2e_p99_ms, l.e2e_max_ms
    );
    let _ = writeln!(
        o,
        "| p99 latency at {offered_rate:.0} events/s offered (worse of the two) | {p99_worst:.1} ms | ≤ 50 ms at 2k/s | {} |",
        // The target is stated at 2k events/s; a lighter load proves nothing about it.
        if offered_rate < 0.95 * 2000.0 {
            "n/a (offered < 2k/s)"
        } else {
            verdict(p99_worst <= 50.0)
        }
    );
    let _ = writeln!(
        o,
        "| Worker peak RSS (VmHWM): drain workers / latency-phase worker | {} / {rss_lat:.1} MiB | ≤ 100 MiB | {} |",
        spread(&rss_drain, |v| format!("{v:.1}")),
        verdict(rss_max <= 100.0)
    );

    let _ = writeln!(o, "\nEach round:\n");
    let _ = writeln!(
        o,
        "| Round | Relay | Relay 10–90 % | First ack | Most in flight | Peak RSS | pg_recvlogical | pg_recvlogical 10–90 % | Polling | Relay / recvlogical | Relay / polling |"
    );
    let _ = writeln!(o, "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (i, x) in rounds.iter().enumerate() {
        let _ = writeln!(
            o,
            "| {} | {:.0}/s | {:.0}/s | {} | {} | {:.1} MiB | {:.0}/s | {:.0}/s | {:.0}/s | {:.2}× | {:.2}× |",
            i + 1,
            x.relay.rate(),
            steady(&x.relay),
            x.relay_first_ack.map_or("n/a".into(), |t| format!("{t:.2} s")),
            x.relay_max_in_flight,
            x.relay_rss_kib as f64 / 1024.0,
            x.recv.rate(),
            steady(&x.recv),
            x.poll.rate(),
            x.relay.rate() / x.recv.rate(),
            x.relay.rate() / x.poll.rate(),
        );
    }

    let _ = writeln!(
        o,
        "\nCPU seconds per phase, mean over the rounds (\"ours\" is client, PostgreSQL, Kafka and bench together):\n"
    );
    let _ = writeln!(
        o,
        "| Phase | Wall | Client | PostgreSQL | Kafka | Bench process | Other processes | Ours per 1000 events |"
    );
    let _ = writeln!(o, "| --- | --- | --- | --- | --- | --- | --- | --- |");
    let recvs: Vec<&Drain> = rounds.iter().map(|x| &x.recv).collect();
    let relays: Vec<&Drain> = rounds.iter().map(|x| &x.relay).collect();
    let polls: Vec<&Drain> = rounds.iter().map(|x| &x.poll).collect();
    let _ = writeln!(
        o,
        "{}",
        cpu_line("pg_recvlogical drain", &mean_drain(&recvs), "pg_recvlogical")
    );
    let _ = writeln!(o, "{}", cpu_line("Relay drain", &mean_drain(&relays), "worker"));
    let _ = writeln!(o, "{}", cpu_line("Polling publisher", &mean_drain(&polls), "publisher"));
    let lat_drain = Drain {
        secs: l.offered_secs,
        events: l.offered as i64,
        cpu: l.cpu,
        steady: None,
    };
    let _ = writeln!(
        o,
        "{}",
        cpu_line("Latency phase (inserts included)", &lat_drain, "worker")
    );

    let _ = writeln!(o, "\nDetails:\n");
    let _ = writeln!(
        o,
        "- Latency phase: a worker on a fresh slot; {} events offered in {:.1} s after {} s of warm-up at the \
         same rate (not counted), one INSERT per transaction, pipelined on one connection, a batch every \
         10 ms. The worker's histogram counted {} events in that window, the topic read back {}.",
        l.offered, l.offered_secs, args.warmup_seconds, l.hist_count, l.e2e_count,
    );
    let tuning = outbox_operator::relay::config::Tuning::default();
    let _ = writeln!(
        o,
        "- Relay drains: the worker pauses reading at {} events or {:.0} MiB of records in flight; a \
         round at that cap had Kafka as the slower side. \"First ack\" is counted from the worker's \
         process start.",
        tuning.max_in_flight,
        tuning.max_in_flight_bytes as f64 / 1048576.0,
    );
    let _ = writeln!(
        o,
        "- Kafka: {} compression; log bytes per event on the broker's disk: relay {:.0}, polling {:.0}. \
         The warm-up producer's first acknowledgement took {:.0} ms. Every topic was checked to hold \
         at least {} records.",
        args.compression,
        r.relay_log_bytes as f64 / n,
        r.poll_log_bytes as f64 / n,
        r.first_ack_ms,
        args.events,
    );
    let _ = writeln!(
        o,
        "- PostgreSQL: a polling table's inserts write {:.0} WAL bytes per event (its partial index \
         on unsent rows comes on top of the outbox's); pg_recvlogical wrote {:.0} MiB per drain. \
         The outbox preload took {:.1} s.",
        r.poll_insert_wal_per_event,
        median(col(&|x| x.recv_file_bytes as f64)) / 1048576.0,
        r.preload_secs,
    );
    let _ = writeln!(
        o,
        "\nReproduce: `hack/bench --events {} --rate {} --latency-seconds {}{}{}{}{}`",
        args.events,
        args.rate,
        args.latency_seconds,
        if args.rounds != 3 {
            format!(" --rounds {}", args.rounds)
        } else {
            String::new()
        },
        if args.polling_workers > 1 {
            format!(" --polling-workers {}", args.polling_workers)
        } else {
            String::new()
        },
        if args.compression != "lz4" {
            format!(" --compression {}", args.compression)
        } else {
            String::new()
        },
        if args.payload != Payload::Order {
            format!(" --payload {}", args.payload.name())
        } else {
            String::new()
        }
    );
    o
}
