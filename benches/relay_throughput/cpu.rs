//! CPU accounting from /proc: who burnt the CPU during a phase (PostgreSQL with
//! all its processes, the Kafka broker, the client under test, this process, and
//! everything else on the machine).
//!
//! Every phase samples it the same way, before and after; keeping the /proc
//! parsing here leaves the phases free of it.

use std::path::Path;
use std::process::Command;

use outbox_testbed::{Kafka, Postgres};

use crate::Res;

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Fields of /proc/PID/stat after the command name (which may hold spaces).
fn proc_stat(pid: u32) -> Option<Vec<u64>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    // Index 0 is the state letter; keep positions by mapping it to 0.
    Some(rest.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect())
}

/// User+system CPU seconds of a process (all its threads); with `children`, plus
/// the times of the children it has waited for.
pub fn proc_cpu_secs(pid: u32, children: bool) -> Option<f64> {
    let f = proc_stat(pid)?;
    // utime, stime, cutime, cstime are fields 14-17 of the file.
    let mut ticks = f.get(11)? + f.get(12)?;
    if children {
        ticks += f.get(13)? + f.get(14)?;
    }
    Some(ticks as f64 / clock_ticks())
}

/// All of PostgreSQL: the postmaster with every child it reaped, plus the live
/// children (backends, walsenders, background processes).
fn postgres_cpu_secs(pg: &Postgres) -> Res<f64> {
    let pidfile = std::fs::read_to_string(pg.data_dir().join("postmaster.pid"))?;
    let postmaster: u32 = pidfile.lines().next().unwrap_or_default().trim().parse()?;
    let mut total = proc_cpu_secs(postmaster, true).ok_or("postmaster is gone")?;
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        // Field 4 (ppid) is index 1 here.
        if let Some(f) = proc_stat(pid)
            && f.get(1) == Some(&u64::from(postmaster))
        {
            total += proc_cpu_secs(pid, false).unwrap_or(0.0);
        }
    }
    Ok(total)
}

/// The broker is the JVM whose command line names this bed's config file (its
/// watchdog shell names it too, hence the check of the program name).
pub fn find_kafka_pid(kafka: &Kafka) -> Option<u32> {
    let config = kafka.log_path().parent()?.join("server.properties");
    let config = config.to_string_lossy();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let argv: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let program = Path::new(argv.first()?).file_name()?.to_string_lossy().into_owned();
        (program == "java" && argv.iter().any(|a| a == "kafka.Kafka") && argv.iter().any(|a| *a == *config))
            .then_some(pid)
    })
}

#[derive(Clone, Copy, Debug, Default)]
pub struct CpuSample {
    pg: f64,
    kafka: f64,
    driver: f64,
    /// Busy time of the whole machine, all CPUs.
    machine: f64,
}

/// Busy CPU seconds of the whole machine since boot (the first line of /proc/stat,
/// without idle and iowait).
fn machine_busy_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else { return 0.0 };
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let busy: u64 = f
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    busy as f64 / clock_ticks()
}

impl CpuSample {
    pub fn take(pg: &Postgres, kafka_pid: u32) -> Res<Self> {
        Ok(Self {
            pg: postgres_cpu_secs(pg)?,
            kafka: proc_cpu_secs(kafka_pid, false).ok_or("the Kafka broker is gone")?,
            driver: proc_cpu_secs(std::process::id(), false).unwrap_or(0.0),
            machine: machine_busy_secs(),
        })
    }

    pub fn since(&self, before: &CpuSample, client: f64) -> Cpu {
        let mut cpu = Cpu {
            postgres: self.pg - before.pg,
            kafka: self.kafka - before.kafka,
            bench: self.driver - before.driver,
            client,
            other: 0.0,
        };
        let ours = cpu.postgres + cpu.kafka + cpu.bench + cpu.client;
        cpu.other = (self.machine - before.machine - ours).max(0.0);
        cpu
    }
}

/// CPU seconds spent during one phase.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu {
    pub postgres: f64,
    pub kafka: f64,
    /// This process (for the polling phase it is the publisher itself).
    pub bench: f64,
    /// The client under test: the worker, or pg_recvlogical.
    pub client: f64,
    /// Everything else on the machine (the kernel's own work included): a large
    /// number means something else competed for the CPUs and the phase is suspect.
    pub other: f64,
}
