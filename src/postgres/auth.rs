//! No password in the clear: a server that asks for `password` (cleartext)
//! authentication over an unencrypted connection gets no answer, unless the spec
//! opts in with `spec.database.tls.allowCleartextPassword` (libpq's
//! `require_auth=!password` the other way round).
//!
//! With `tls.mode: Prefer` a connection falls back to plaintext when the server (or
//! anything in between) refuses TLS, and then a cleartext request would put the
//! password on the wire. MD5 and SCRAM never send it, so only this one request is
//! refused.
//!
//! The replication client asks [`cleartext_allowed`] where it answers the request.
//! tokio-postgres answers it internally, so SQL connections run over a
//! [`CleartextGuard`]: a socket wrapper that watches what the server sends before
//! authentication completes and fails the read that carries a cleartext request on a
//! stream that did not switch to TLS.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `AuthenticationCleartextPassword`: an `R` message with code 3.
const AUTH_CLEARTEXT: i32 = 3;
/// `AuthenticationOk`: authentication is over.
const AUTH_OK: i32 = 0;
/// The protocol's `SSLRequest` code.
const SSL_REQUEST_CODE: i32 = 80877103;

/// The refusal, carried inside an `io::Error` through tokio-postgres.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CleartextRefused;

impl fmt::Display for CleartextRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "the server asked for the password in clear text (password authentication) over an unencrypted \
             connection; refused",
        )
    }
}

impl std::error::Error for CleartextRefused {}

/// Whether a cleartext password request may be answered: always over TLS, else only
/// when the spec allows it.
pub fn cleartext_allowed(encrypted: bool, allow_cleartext_password: bool) -> Result<(), CleartextRefused> {
    if encrypted || allow_cleartext_password {
        Ok(())
    } else {
        Err(CleartextRefused)
    }
}

/// Whether `e`, or anything in its source chain, is a [`CleartextRefused`] (also
/// inside an `io::Error`, whose `source()` skips its own payload).
pub fn is_refusal(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if e.is::<CleartextRefused>() {
            return true;
        }
        if let Some(inner) = e.downcast_ref::<io::Error>().and_then(io::Error::get_ref)
            && inner.is::<CleartextRefused>()
        {
            return true;
        }
        cur = e.source();
    }
    false
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Collecting the first 8 bytes the client writes: an `SSLRequest` or not.
    FirstWrite { seen: Vec<u8> },
    /// `SSLRequest` sent; the server's one-byte answer decides.
    SslAnswer,
    /// Plaintext protocol before authentication is over: parse server messages.
    Plain(Parser),
    /// TLS, or authentication is over: nothing more to watch.
    Done,
}

/// Splits the server's byte stream into messages far enough to see each
/// authentication request's code.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Parser {
    /// The current message's tag, length and (for `R`) code bytes seen so far.
    head: Vec<u8>,
    /// Body bytes of the current message still to skip.
    skip: usize,
}

#[derive(Debug, PartialEq, Eq)]
enum Seen {
    More,
    Cleartext,
    AuthDone,
}

impl Parser {
    fn feed(&mut self, mut bytes: &[u8]) -> Seen {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            self.head.push(bytes[0]);
            bytes = &bytes[1..];
            // tag (1) + length (4), and for `R` its code (4).
            let want = if self.head[0] == b'R' { 9 } else { 5 };
            if self.head.len() < want {
                continue;
            }
            let len = i32::from_be_bytes([self.head[1], self.head[2], self.head[3], self.head[4]]);
            let body = usize::try_from(len).unwrap_or(0).saturating_sub(4);
            if self.head[0] == b'R' {
                let code = i32::from_be_bytes([self.head[5], self.head[6], self.head[7], self.head[8]]);
                match code {
                    AUTH_CLEARTEXT => return Seen::Cleartext,
                    AUTH_OK => return Seen::AuthDone,
                    _ => {}
                }
                self.skip = body.saturating_sub(4);
            } else {
                self.skip = body;
            }
            self.head.clear();
        }
        Seen::More
    }
}

/// A socket that refuses to carry a cleartext password request over plaintext.
///
/// It sits under tokio-postgres's TLS: when the client's first message is an
/// `SSLRequest` answered with `S`, everything after is TLS and is not looked at.
pub struct CleartextGuard<S> {
    inner: S,
    state: State,
    allow: bool,
}

impl<S> CleartextGuard<S> {
    pub fn new(inner: S, allow_cleartext_password: bool) -> Self {
        Self {
            inner,
            state: State::FirstWrite { seen: Vec::new() },
            allow: allow_cleartext_password,
        }
    }

    fn wrote(&mut self, bytes: &[u8]) {
        if let State::FirstWrite { seen } = &mut self.state {
            let n = (8 - seen.len()).min(bytes.len());
            seen.extend_from_slice(&bytes[..n]);
            if seen.len() == 8 {
                let code = i32::from_be_bytes([seen[4], seen[5], seen[6], seen[7]]);
                self.state = if seen[..4] == 8i32.to_be_bytes() && code == SSL_REQUEST_CODE {
                    State::SslAnswer
                } else {
                    State::Plain(Parser::default())
                };
            }
        }
    }

    /// Looks at bytes the server sent; an error means: do not hand them on.
    fn read(&mut self, mut bytes: &[u8]) -> Result<(), CleartextRefused> {
        if self.state == State::SslAnswer && !bytes.is_empty() {
            self.state = if bytes[0] == b'S' {
                State::Done
            } else {
                State::Plain(Parser::default())
            };
            bytes = &bytes[1..];
        }
        if let State::Plain(parser) = &mut self.state {
            match parser.feed(bytes) {
                Seen::More => {}
                Seen::AuthDone => self.state = State::Done,
                Seen::Cleartext => {
                    cleartext_allowed(false, self.allow)?;
                    // Allowed: the rest of the exchange is not our concern.
                    self.state = State::Done;
                }
            }
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CleartextGuard<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.state != State::Done
                    && let Err(refused) = this.read(&buf.filled()[before..])
                {
                    buf.set_filled(before);
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::PermissionDenied, refused)));
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CleartextGuard<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            this.wrote(&buf[..*n]);
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(code: i32) -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend_from_slice(&8i32.to_be_bytes());
        m.extend_from_slice(&code.to_be_bytes());
        m
    }

    fn ssl_request() -> Vec<u8> {
        let mut m = 8i32.to_be_bytes().to_vec();
        m.extend_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
        m
    }

    fn startup() -> Vec<u8> {
        // length, protocol 3.0, "user\0u\0\0"
        let mut m = 17i32.to_be_bytes().to_vec();
        m.extend_from_slice(&196608i32.to_be_bytes());
        m.extend_from_slice(b"user\0u\0\0\0");
        m
    }

    #[test]
    fn policy() {
        assert_eq!(cleartext_allowed(true, false), Ok(()));
        assert_eq!(cleartext_allowed(false, true), Ok(()));
        assert_eq!(cleartext_allowed(false, false), Err(CleartextRefused));
    }

    #[test]
    fn plaintext_cleartext_request_is_refused_also_split_across_reads() {
        let mut g = CleartextGuard::new((), false);
        g.wrote(&startup());
        let m = auth(AUTH_CLEARTEXT);
        // A notice first, then the request one byte at a time.
        let mut notice = vec![b'N'];
        notice.extend_from_slice(&6i32.to_be_bytes());
        notice.extend_from_slice(b"x\0");
        assert_eq!(g.read(&notice), Ok(()));
        for (i, b) in m.iter().enumerate() {
            let r = g.read(std::slice::from_ref(b));
            if i + 1 < m.len() {
                assert_eq!(r, Ok(()), "byte {i}");
            } else {
                assert_eq!(r, Err(CleartextRefused));
            }
        }
    }

    #[test]
    fn prefer_fallback_to_plaintext_is_watched() {
        let mut g = CleartextGuard::new((), false);
        g.wrote(&ssl_request()[..3]);
        g.wrote(&ssl_request()[3..]);
        assert_eq!(g.state, State::SslAnswer);
        assert_eq!(g.read(b"N"), Ok(()));
        g.wrote(&startup());
        assert_eq!(g.read(&auth(AUTH_CLEARTEXT)), Err(CleartextRefused));
    }

    #[test]
    fn tls_md5_scram_and_opt_in_pass() {
        let mut tls = CleartextGuard::new((), false);
        tls.wrote(&ssl_request());
        assert_eq!(tls.read(b"S"), Ok(()));
        assert_eq!(tls.state, State::Done, "after S everything is TLS records");

        let mut md5 = CleartextGuard::new((), false);
        md5.wrote(&startup());
        let mut m = vec![b'R'];
        m.extend_from_slice(&12i32.to_be_bytes());
        m.extend_from_slice(&5i32.to_be_bytes());
        m.extend_from_slice(b"salt");
        m.extend(auth(AUTH_OK));
        assert_eq!(md5.read(&m), Ok(()));
        assert_eq!(md5.state, State::Done);

        let mut allowed = CleartextGuard::new((), true);
        allowed.wrote(&startup());
        assert_eq!(allowed.read(&auth(AUTH_CLEARTEXT)), Ok(()));
    }

    #[test]
    fn refusal_is_found_inside_io_errors() {
        let e = io::Error::new(io::ErrorKind::PermissionDenied, CleartextRefused);
        assert!(is_refusal(&e));
        assert!(!is_refusal(&io::Error::other("x")));
    }
}
