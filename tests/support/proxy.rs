//! A loopback TCP proxy whose connections can go silent: `freeze()` stops
//! forwarding on every connection open at that moment, in both directions,
//! while keeping them open (no FIN, no RST), like a half-open connection or a
//! stuck middlebox. The kernel still acknowledges, so TCP keepalive alone does
//! not notice; only the application can. Connections made later work normally,
//! so a client that reconnects gets through.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

pub struct SilentProxy {
    pub port: u16,
    /// Connections numbered below this are frozen.
    frozen_below: Arc<AtomicU64>,
    next: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl SilentProxy {
    /// Forwards 127.0.0.1:<port> to `target_host:target_port`.
    pub async fn start(target_host: &str, target_port: u16) -> SilentProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let frozen_below = Arc::new(AtomicU64::new(0));
        let next = Arc::new(AtomicU64::new(0));
        let target = format!("{target_host}:{target_port}");
        let (f, n) = (frozen_below.clone(), next.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let Ok(server) = TcpStream::connect(&target).await else {
                    continue;
                };
                let id = n.fetch_add(1, Ordering::SeqCst);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, id, f.clone()));
                tokio::spawn(pump(sr, cw, id, f.clone()));
            }
        });
        SilentProxy {
            port,
            frozen_below,
            next,
            task,
        }
    }

    /// Every connection open now stops forwarding for good, and stays open.
    pub fn freeze(&self) {
        self.frozen_below
            .store(self.next.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

impl Drop for SilentProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, id: u64, frozen_below: Arc<AtomicU64>) {
    let frozen = || id < frozen_below.load(Ordering::SeqCst);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if frozen() {
            // Hold both halves (the connection stays open) and forward nothing.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        match tokio::time::timeout(Duration::from_millis(50), from.read(&mut buf)).await {
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => return,
            // Bytes read just as the freeze came are swallowed, never delivered.
            Ok(Ok(_)) if frozen() => continue,
            Ok(Ok(n)) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
