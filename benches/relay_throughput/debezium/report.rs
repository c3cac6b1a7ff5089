//! The Debezium section of the report: the baseline's figures next to the
//! relay's of the same run. Only formatting, like the main report.

use std::fmt::Write as _;

use super::{CONNECT_VERSION, DEBEZIUM_VERSION, DebeziumDrain, DebeziumResults};
use crate::Args;
use crate::cpu::Cpu;
use crate::drain::Drain;
use crate::report::{Results, Round, spread};

/// The report's section: the baseline's figures next to the relay's of the same
/// run, as ratios (Debezium / relay) taken within each round first.
pub fn section(args: &Args, r: &Results, d: &DebeziumResults) -> String {
    let pairs: Vec<(&Round, &DebeziumDrain)> = r.rounds.iter().zip(&d.rounds).collect();
    let col = |f: &dyn Fn(&Round, &DebeziumDrain) -> f64| pairs.iter().map(|(x, y)| f(x, y)).collect::<Vec<f64>>();
    let rate = |v: f64| format!("{v:.0}/s");
    let secs = |v: f64| format!("{v:.2} s");
    let mib = |v: f64| format!("{v:.1} MiB");
    let times = |v: f64| format!("{v:.2}×");
    let steady = |d: &Drain| d.steady.map_or(f64::NAN, |s| s.1);
    let per_k = |cpu: f64, events: i64| cpu * 1e6 / events.max(1) as f64;
    let first = |v: Option<f64>| v.unwrap_or(f64::NAN);
    let servers = |c: &Cpu| c.postgres + c.kafka;
    let n = args.events;
    let l = &r.lat;
    let dl = &d.lat;

    let mut o = String::new();
    let _ = writeln!(o, "\n### Debezium baseline\n");
    let _ = writeln!(
        o,
        "Kafka Connect {CONNECT_VERSION} standalone with Debezium {DEBEZIUM_VERSION}'s PostgreSQL connector \
         and outbox EventRouter, over a pgoutput slot of its own per round holding the same WAL, into the same \
         broker; each round's Connect drain follows that round's other drains. Debezium / relay > 1× means more \
         for Debezium: faster for rates, slower or larger for times, memory and CPU.\n"
    );
    let _ = writeln!(o, "| Measure | Relay | Debezium | Debezium / relay |");
    let _ = writeln!(o, "| --- | --- | --- | --- |");
    let row = |o: &mut String, name: &str, a: &[f64], b: &[f64], fmt: &dyn Fn(f64) -> String, ratio: &[f64]| {
        let _ = writeln!(
            o,
            "| {name} | {} | {} | {} |",
            spread(a, fmt),
            spread(b, fmt),
            spread(ratio, times)
        );
    };
    row(
        &mut o,
        "Drain, from process start until all records are on the topic (relay: until its slot confirms them)",
        &col(&|x, _| x.relay.rate()),
        &col(&|_, y| y.drain.rate()),
        &rate,
        &col(&|x, y| y.drain.rate() / x.relay.rate()),
    );
    row(
        &mut o,
        "Steady rate, 10–90 % of the backlog",
        &col(&|x, _| steady(&x.relay)),
        &col(&|_, y| steady(&y.drain)),
        &rate,
        &col(&|x, y| steady(&y.drain) / steady(&x.relay)),
    );
    row(
        &mut o,
        "Time to the first record from process start (relay: first ack)",
        &col(&|x, _| first(x.relay_first_ack)),
        &col(&|_, y| first(y.first_record)),
        &secs,
        &col(&|x, y| first(y.first_record) / first(x.relay_first_ack)),
    );
    row(
        &mut o,
        "Client CPU per 1000 events during a drain (JVM start and JIT included)",
        &col(&|x, _| per_k(x.relay.cpu.client, n)),
        &col(&|_, y| per_k(y.drain.cpu.client, n)),
        &|v| format!("{v:.1} ms"),
        &col(&|x, y| y.drain.cpu.client / x.relay.cpu.client),
    );
    row(
        &mut o,
        "PostgreSQL + Kafka CPU per 1000 events during a drain",
        &col(&|x, _| per_k(servers(&x.relay.cpu), n)),
        &col(&|_, y| per_k(servers(&y.drain.cpu), n)),
        &|v| format!("{v:.1} ms"),
        &col(&|x, y| servers(&y.drain.cpu) / servers(&x.relay.cpu)),
    );
    row(
        &mut o,
        "Peak RSS (VmHWM) of the drain's process",
        &col(&|x, _| x.relay_rss_kib as f64 / 1024.0),
        &col(&|_, y| y.rss_kib as f64 / 1024.0),
        &mib,
        &col(&|x, y| y.rss_kib as f64 / x.relay_rss_kib.max(1) as f64),
    );
    let dbz_log = d.rounds.last().map_or(0, |y| y.log_bytes);
    let _ = writeln!(
        o,
        "| Bytes per event on the broker's disk (last round's topic) | {:.0} | {:.0} | {} |",
        r.relay_log_bytes as f64 / n as f64,
        dbz_log as f64 / n as f64,
        times(dbz_log as f64 / r.relay_log_bytes.max(1) as f64),
    );
    let _ = writeln!(
        o,
        "| Insert→broker append p50 / p99 / max at {:.0} events/s offered | {:.1} / {:.1} / {:.1} ms | {:.1} / {:.1} / {:.1} ms | {} / {} |",
        dl.offered as f64 / dl.offered_secs,
        l.e2e_p50_ms,
        l.e2e_p99_ms,
        l.e2e_max_ms,
        dl.p50_ms,
        dl.p99_ms,
        dl.max_ms,
        times(dl.p50_ms / l.e2e_p50_ms),
        times(dl.p99_ms / l.e2e_p99_ms),
    );
    let _ = writeln!(
        o,
        "| Client CPU seconds during the latency window ({:.0} s) | {:.1} s | {:.1} s | {} |",
        dl.offered_secs,
        l.cpu.client,
        dl.cpu.client,
        times(dl.cpu.client / l.cpu.client),
    );
    let _ = writeln!(
        o,
        "| Peak RSS of the latency phase's process | {:.1} MiB | {:.1} MiB | {} |",
        r.relay_rss_after_latency_kib as f64 / 1024.0,
        dl.rss_kib as f64 / 1024.0,
        times(dl.rss_kib as f64 / r.relay_rss_after_latency_kib.max(1) as f64),
    );

    let _ = writeln!(o, "\nEach round:\n");
    let _ = writeln!(
        o,
        "| Round | Relay | Debezium | Debezium 10–90 % | Debezium / relay | First record | Connect CPU | PostgreSQL / Kafka CPU | Other processes' CPU | Connect peak RSS |"
    );
    let _ = writeln!(o, "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (i, (x, y)) in pairs.iter().enumerate() {
        let _ = writeln!(
            o,
            "| {} | {:.0}/s | {:.0}/s | {:.0}/s | {:.2}× | {} | {:.1} s | {:.1} s / {:.1} s | {:.1} s | {:.1} MiB |",
            i + 1,
            x.relay.rate(),
            y.drain.rate(),
            steady(&y.drain),
            y.drain.rate() / x.relay.rate(),
            y.first_record
                .map_or("n/a".into(), |t| format!("{t:.2} s ({:.1} CPU-s)", y.first_record_cpu)),
            y.drain.cpu.client,
            y.drain.cpu.postgres,
            y.drain.cpu.kafka,
            y.drain.cpu.other,
            y.rss_kib as f64 / 1024.0,
        );
    }
    let _ = writeln!(
        o,
        "\n- Latency phase: Connect on a slot created just before it started; it streamed {:.1} s after its \
         start (probe rows every 200 ms until one reached the topic), then {} s of warm-up at the offered rate, \
         then {} events in {:.1} s, of which the topic read back {}.",
        dl.first_record, args.warmup_seconds, dl.offered, dl.offered_secs, dl.count,
    );
    let _ = writeln!(
        o,
        "- Producer: acks=all, idempotence, 5 requests in flight, {} compression, linger 5 ms, batch.size \
         1 000 000 (librdkafka's default, which the relay uses). Debezium's own batching at its defaults \
         (max.batch.size 2048, max.queue.size 8192), poll.interval.ms {}.",
        args.compression,
        args.debezium_poll_ms
            .map_or("500 (Debezium's default)".to_string(), |ms| format!(
                "{ms} (--debezium-poll-interval-ms)"
            )),
    );
    let _ = writeln!(
        o,
        "- Records: key = aggregateid, value = the payload's JSON text, headers `id` and `type` as the relay's, \
         plus Debezium's four `__debezium.context.*` headers (`extended.headers.enabled`, on by default); \
         Connect's log says it cannot load Debezium's CloudEventsConverter against this Connect's JsonConverter, \
         which this set-up does not use."
    );
    let _ = writeln!(
        o,
        "\nReproduce: add `--with-debezium{}` to the command above.",
        args.debezium_poll_ms
            .map_or(String::new(), |ms| format!(" --debezium-poll-interval-ms {ms}"))
    );
    o
}
