//! A small test runner for cluster test binaries (`harness = false`).
//!
//! libtest cannot be told to move into new namespaces before it starts its test
//! threads, so these binaries have their own `main`: outside the namespaces it
//! re-executes itself ([`super::isolate`]); inside, it runs the tests one after
//! another on the shared cluster (they would compete for two cores anyway) and
//! prints libtest's lines, including the `test result:` summary that `hack/test`
//! adds up. Arguments: name filters (substrings, or exact names with `--exact`);
//! `--list` lists; other flags are accepted and ignored.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::process::ExitCode;
use std::time::Instant;

/// One test: its name and its body.
pub type TestFn = fn() -> Pin<Box<dyn Future<Output = ()>>>;

/// `cluster_tests![a, b]` gives the table for [`main`] from async test functions.
#[macro_export]
macro_rules! cluster_tests {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), (|| Box::pin($name()) as ::std::pin::Pin<Box<dyn ::std::future::Future<Output = ()>>>) as $crate::cluster::TestFn)),*]
    };
}

/// The `main` of a program other than a test (the demo) that runs on the cluster:
/// re-executes itself in the namespaces, then runs `body` there.
pub fn run_isolated<F, Fut, E>(body: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    if !super::isolate::inside() {
        return super::isolate::run_outer();
    }
    if let Err(e) = super::isolate::prepare_inside() {
        eprintln!("cluster test bed: setting up the namespaces failed: {e}");
        return ExitCode::FAILURE;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("building a tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(body()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The `main` of a cluster test binary.
pub fn main(tests: &[(&'static str, TestFn)]) -> ExitCode {
    if !super::isolate::inside() {
        return super::isolate::run_outer();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let exact = args.iter().any(|a| a == "--exact");
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let selected: Vec<_> = tests
        .iter()
        .filter(|(name, _)| {
            filters.is_empty()
                || filters
                    .iter()
                    .any(|f| if exact { name == f } else { name.contains(f.as_str()) })
        })
        .collect();
    if args.iter().any(|a| a == "--list") {
        for (name, _) in &selected {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    if let Err(e) = super::isolate::prepare_inside() {
        eprintln!("cluster test bed: setting up the namespaces failed: {e}");
        return ExitCode::FAILURE;
    }
    let started = Instant::now();
    println!("\nrunning {} tests", selected.len());
    let mut failed = Vec::new();
    for (name, test) in &selected {
        let t0 = Instant::now();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("building a tokio runtime");
            rt.block_on(test());
            rt.shutdown_timeout(std::time::Duration::from_secs(5));
        }));
        let secs = t0.elapsed().as_secs_f32();
        match outcome {
            Ok(()) => println!("test {name} ... ok ({secs:.1}s)"),
            Err(_) => {
                println!("test {name} ... FAILED ({secs:.1}s)");
                failed.push(*name);
            }
        }
    }
    if !failed.is_empty() {
        println!("\nfailures:");
        for name in &failed {
            println!("    {name}");
        }
    }
    let passed = selected.len() - failed.len();
    println!(
        "\ntest result: {}. {passed} passed; {} failed; 0 ignored; 0 measured; {} filtered out; finished in {:.2}s\n",
        if failed.is_empty() { "ok" } else { "FAILED" },
        failed.len(),
        tests.len() - selected.len(),
        started.elapsed().as_secs_f32(),
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
