//! The CSI socket takes any `:authority`. h2, under tonic, resets a request whose `:authority`
//! is not a URI authority (RST_STREAM PROTOCOL_ERROR), and neither h2 0.3, hyper 0.14 nor
//! tonic 0.11 has a switch for it. Over a unix socket there is no host to name and clients
//! disagree on what to send: kubelet (≥ 1.26) and grpc-go send `localhost`, but grpcio ≥ 1.57
//! (Python, C++, Ruby) sends the socket path %-encoded, grpc-java and `csc` the path itself —
//! and those are the tools a person debugs a CSI driver with.
//!
//! So the plugin reads what a client sends before h2 does ([`Repaired`] around each accepted
//! connection). Frames pass through as they are, except header blocks: each is decoded
//! ([`super::hpack`]; the decoder keeps the client's dynamic table in step), an `:authority`
//! that h2 would refuse becomes `localhost` (nothing in the plugin reads it), and the block is
//! written again with literals that enter no table, as one HEADERS frame and CONTINUATIONs of at
//! most the frame size every HTTP/2 server takes. Anything that is not an HTTP/2 connection with
//! prior knowledge is passed on untouched, for h2 to refuse as before. A block that does not
//! decode ends the connection, as h2 would have (COMPRESSION_ERROR).
//!
//! The rewriting is pure ([`Rewriter`]: bytes in, bytes out) and tested on its own; the CSI
//! test runs a real grpcio client against the plugin with the authority it sends by default.

use super::hpack;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a client sends first on an HTTP/2 connection with prior knowledge.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// The largest frame payload written: SETTINGS_MAX_FRAME_SIZE's initial value, which every
/// server takes.
const MAX_FRAME: usize = 16384;

/// The largest header block read (its frames together): a CSI call's headers are a few hundred
/// bytes; this bounds what a client can make the plugin hold.
const MAX_BLOCK: usize = 1 << 20;

/// What an `:authority` h2 refuses becomes.
const AUTHORITY: &[u8] = b"localhost";

/// Why a connection's bytes cannot be passed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// Where in the client's byte stream the rewriter is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the preface.
    Preface,
    /// At a frame boundary, or `n` bytes into the payload of a frame passed through.
    Frames { passing: usize },
    /// Not HTTP/2 with prior knowledge: everything goes through as it is.
    Untouched,
}

/// A header block being read: its HEADERS frame's stream and END_STREAM, and its fragments.
#[derive(Debug)]
struct Block {
    stream: u32,
    end_stream: bool,
    fragment: Vec<u8>,
}

/// The client-to-server byte stream of one connection, header blocks rewritten.
#[derive(Debug)]
pub struct Rewriter {
    state: State,
    /// Bytes received and not yet passed on (at most a frame).
    input: Vec<u8>,
    block: Option<Block>,
    decoder: hpack::Decoder,
    /// Authorities replaced so far (the first is logged).
    pub replaced: u64,
}

impl Default for Rewriter {
    fn default() -> Self {
        Rewriter {
            state: State::Preface,
            input: Vec::new(),
            block: None,
            decoder: hpack::Decoder::new(hpack::DEFAULT_TABLE_SIZE),
            replaced: 0,
        }
    }
}

impl Rewriter {
    /// Takes `data` from the client; appends to `out` what the server gets.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), Refused> {
        self.input.extend_from_slice(data);
        let mut at = 0;
        let result = self.run(&mut at, out);
        self.input.drain(..at);
        result
    }

    fn run(&mut self, at: &mut usize, out: &mut Vec<u8>) -> Result<(), Refused> {
        loop {
            let avail = &self.input[*at..];
            match self.state {
                State::Untouched => {
                    out.extend_from_slice(avail);
                    *at = self.input.len();
                    return Ok(());
                }
                State::Preface => {
                    let n = avail.len().min(PREFACE.len());
                    if avail[..n] != PREFACE[..n] {
                        self.state = State::Untouched;
                    } else if n < PREFACE.len() {
                        return Ok(());
                    } else {
                        out.extend_from_slice(PREFACE);
                        *at += n;
                        self.state = State::Frames { passing: 0 };
                    }
                }
                State::Frames { passing } if passing > 0 => {
                    let n = avail.len().min(passing);
                    if n == 0 {
                        return Ok(());
                    }
                    out.extend_from_slice(&avail[..n]);
                    *at += n;
                    self.state = State::Frames {
                        passing: passing - n,
                    };
                }
                State::Frames { .. } => {
                    if avail.len() < 9 {
                        return Ok(());
                    }
                    let len = usize::from(avail[0]) << 16
                        | usize::from(avail[1]) << 8
                        | usize::from(avail[2]);
                    let (kind, flags) = (avail[3], avail[4]);
                    let stream =
                        u32::from_be_bytes([avail[5], avail[6], avail[7], avail[8]]) & 0x7fff_ffff;
                    if kind != HEADERS && kind != CONTINUATION {
                        if self.block.is_some() {
                            return Err(Refused(format!(
                                "a frame of type {kind} inside a header block"
                            )));
                        }
                        out.extend_from_slice(&avail[..9]);
                        *at += 9;
                        self.state = State::Frames { passing: len };
                        continue;
                    }
                    if len > MAX_BLOCK {
                        return Err(Refused(format!("a header frame of {len} bytes")));
                    }
                    if avail.len() < 9 + len {
                        return Ok(());
                    }
                    let payload = &avail[9..9 + len];
                    let fragment = if kind == HEADERS {
                        if self.block.is_some() {
                            return Err(Refused("HEADERS inside a header block".into()));
                        }
                        let fragment = headers_fragment(flags, payload)?;
                        self.block = Some(Block {
                            stream,
                            end_stream: flags & END_STREAM != 0,
                            fragment: Vec::new(),
                        });
                        fragment
                    } else {
                        match &self.block {
                            Some(b) if b.stream == stream => payload,
                            _ => return Err(Refused("CONTINUATION out of place".into())),
                        }
                    };
                    let block = self.block.as_mut().expect("opened above");
                    if block.fragment.len() + fragment.len() > MAX_BLOCK {
                        return Err(Refused("a header block over 1 MiB".into()));
                    }
                    block.fragment.extend_from_slice(fragment);
                    *at += 9 + len;
                    if flags & END_HEADERS != 0 {
                        let block = self.block.take().expect("opened above");
                        self.rewrite(block, out)?;
                    }
                }
            }
        }
    }

    /// Writes `block` again: decoded, its authority repaired, encoded with literals.
    fn rewrite(&mut self, block: Block, out: &mut Vec<u8>) -> Result<(), Refused> {
        let mut fields = self
            .decoder
            .decode(&block.fragment)
            .map_err(|e| Refused(e.to_string()))?;
        for f in &mut fields {
            if f.name == b":authority" && !valid_authority(&f.value) {
                if self.replaced == 0 {
                    tracing::debug!(
                        authority = %String::from_utf8_lossy(&f.value),
                        "a CSI client sent an :authority that is no host name (a socket path?): taken as localhost"
                    );
                }
                self.replaced += 1;
                f.value = AUTHORITY.to_vec();
            }
        }
        let mut encoded = Vec::new();
        hpack::encode(&fields, &mut encoded);
        let chunks: Vec<&[u8]> = if encoded.is_empty() {
            vec![&[]]
        } else {
            encoded.chunks(MAX_FRAME).collect()
        };
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let (kind, mut flags) = match i {
                0 => (HEADERS, if block.end_stream { END_STREAM } else { 0 }),
                _ => (CONTINUATION, 0),
            };
            if i == last {
                flags |= END_HEADERS;
            }
            frame_header(chunk.len(), kind, flags, block.stream, out);
            out.extend_from_slice(chunk);
        }
        Ok(())
    }
}

/// Whether h2 takes `value` as an `:authority` (the check it makes, from the same crate).
fn valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// The header block fragment of a HEADERS frame's payload: its padding and priority dropped
/// (the frame written instead has neither; h2 ignores priority).
fn headers_fragment(flags: u8, payload: &[u8]) -> Result<&[u8], Refused> {
    let bad = || Refused("a HEADERS frame shorter than its padding and priority".into());
    let (mut start, mut end) = (0, payload.len());
    if flags & PADDED != 0 {
        let pad = usize::from(*payload.first().ok_or_else(bad)?);
        start = 1;
        end = end.checked_sub(pad).ok_or_else(bad)?;
    }
    if flags & PRIORITY != 0 {
        start += 5;
    }
    payload.get(start..end).ok_or_else(bad)
}

fn frame_header(len: usize, kind: u8, flags: u8, stream: u32, out: &mut Vec<u8>) {
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
}

/// An accepted connection whose client bytes go through a [`Rewriter`] before the server
/// reads them; what the server writes goes out as it is.
pub struct Repaired<S> {
    inner: S,
    rewriter: Rewriter,
    /// Rewritten bytes the server has not read yet, from `taken` on.
    ready: Vec<u8>,
    taken: usize,
    scratch: Box<[u8]>,
    eof: bool,
}

impl<S> Repaired<S> {
    pub fn new(inner: S) -> Repaired<S> {
        Repaired {
            inner,
            rewriter: Rewriter::default(),
            ready: Vec::new(),
            taken: 0,
            scratch: vec![0; 64 << 10].into_boxed_slice(),
            eof: false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Repaired<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.taken < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.taken);
                buf.put_slice(&this.ready[this.taken..this.taken + n]);
                this.taken += n;
                if this.taken == this.ready.len() {
                    this.ready.clear();
                    this.taken = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut read = ReadBuf::new(&mut this.scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let data = read.filled();
            if data.is_empty() {
                this.eof = true;
                continue;
            }
            if let Err(e) = this.rewriter.feed(data, &mut this.ready) {
                tracing::warn!(error = %e, "a CSI client's HTTP/2 stream cannot be read: closing the connection");
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Repaired<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Repaired<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::hpack::Field;
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame_header(payload.len(), kind, flags, stream, &mut out);
        out.extend_from_slice(payload);
        out
    }

    /// The frames of `bytes` after the preface: (type, flags, stream, payload).
    fn frames(bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert!(bytes.starts_with(PREFACE));
        let mut rest = &bytes[PREFACE.len()..];
        let mut out = Vec::new();
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            out.push((rest[3], rest[4], stream, rest[9..9 + len].to_vec()));
            rest = &rest[9 + len..];
        }
        out
    }

    /// A literal with incremental indexing of `:authority` (static name 1), plain string.
    fn authority_indexed(value: &str) -> Vec<u8> {
        let mut b = vec![0x41, value.len() as u8];
        b.extend_from_slice(value.as_bytes());
        b
    }

    const SETTINGS: &[u8] = &[0, 0, 0, 0x4, 0, 0, 0, 0, 0];

    /// What grpcio sends, in the shape that matters: the %-encoded socket path as an indexed
    /// literal, then (next request) a reference to that table entry; split at every byte.
    #[test]
    fn a_socket_path_authority_becomes_localhost_and_the_rest_passes_unchanged() {
        let path = "%2Frun%2Fcsi%2Fcsi.sock";
        let mut first = vec![0x83, 0x86, 0x44, 4]; // POST, http, :path "/x/Y" (indexed name 4)
        first.extend_from_slice(b"/x/Y");
        first.extend(authority_indexed(path));
        let second = [0x83, 0x86, 0x84, 0xbe]; // POST, http, /, and dynamic entry 62
        let data = frame(0x0, 0x1, 1, b"\0\0\0\0\0");
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(SETTINGS);
        input.extend(frame(HEADERS, END_HEADERS, 1, &first));
        input.extend_from_slice(&data);
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &second));
        let mut r = Rewriter::default();
        let mut out = Vec::new();
        for b in &input {
            r.feed(std::slice::from_ref(b), &mut out).unwrap();
        }
        assert_eq!(r.replaced, 2);
        let got = frames(&out);
        assert_eq!(got.len(), 4);
        assert_eq!(got[0], (0x4, 0, 0, vec![]), "SETTINGS unchanged");
        assert_eq!(
            frame(got[2].0, got[2].1, got[2].2, &got[2].3),
            data,
            "DATA unchanged"
        );
        let mut d = hpack::Decoder::new(hpack::DEFAULT_TABLE_SIZE);
        let f = |l: &[(&str, &str)]| l.iter().map(|(n, v)| Field::new(n, v)).collect::<Vec<_>>();
        assert_eq!((got[1].0, got[1].1, got[1].2), (HEADERS, END_HEADERS, 1));
        assert_eq!(
            d.decode(&got[1].3).unwrap(),
            f(&[
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/x/Y"),
                (":authority", "localhost")
            ])
        );
        assert_eq!(
            (got[3].0, got[3].1, got[3].2),
            (HEADERS, END_HEADERS | END_STREAM, 3)
        );
        assert_eq!(
            d.decode(&got[3].3).unwrap(),
            f(&[
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "localhost")
            ])
        );
    }

    #[test]
    fn a_valid_authority_is_kept_and_padding_priority_and_continuations_are_read() {
        let mut block = vec![0x83, 0x86, 0x84];
        block.extend(authority_indexed("localhost:50051"));
        block.extend(std::iter::repeat_n(0x84, 40)); // :path / again and again
                                                     // PADDED (3 bytes) and PRIORITY, then the rest of the block in two CONTINUATIONs.
        let mut payload = vec![3, 0, 0, 0, 0, 16];
        payload.extend_from_slice(&block[..10]);
        payload.extend_from_slice(&[0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 5, &payload));
        input.extend(frame(CONTINUATION, 0, 5, &block[10..30]));
        input.extend(frame(CONTINUATION, END_HEADERS, 5, &block[30..]));
        let mut r = Rewriter::default();
        let mut out = Vec::new();
        r.feed(&input, &mut out).unwrap();
        assert_eq!(r.replaced, 0);
        let got = frames(&out);
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].0, got[0].1, got[0].2),
            (HEADERS, END_STREAM | END_HEADERS, 5)
        );
        let fields = hpack::Decoder::new(4096).decode(&got[0].3).unwrap();
        assert_eq!(fields.len(), 44);
        assert_eq!(fields[3], Field::new(":authority", "localhost:50051"));
    }

    #[test]
    fn a_block_larger_than_a_frame_is_split() {
        let mut block = vec![0x83];
        for i in 0..40 {
            // A 1000-byte header, name from the static table (user-agent, 58), incrementally
            // indexed: the table holds only the last four.
            block.extend_from_slice(&[0x40 | 58, 0x7f, 0xe9, 0x06]);
            block.extend(std::iter::repeat_n(b'a' + (i % 26) as u8, 1000));
        }
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 7, &block));
        let mut out = Vec::new();
        Rewriter::default().feed(&input, &mut out).unwrap();
        let got = frames(&out);
        assert_eq!(got.len(), 3, "41 kB in frames of 16 kB");
        assert_eq!((got[0].0, got[0].1), (HEADERS, 0));
        assert_eq!((got[1].0, got[1].1), (CONTINUATION, 0));
        assert_eq!((got[2].0, got[2].1), (CONTINUATION, END_HEADERS));
        assert!(got.iter().all(|f| f.2 == 7 && f.3.len() <= MAX_FRAME));
        let all: Vec<u8> = got.iter().flat_map(|f| f.3.clone()).collect();
        let fields = hpack::Decoder::new(4096).decode(&all).unwrap();
        assert_eq!(fields.len(), 41);
        assert_eq!(fields[40].value, vec![b'a' + 39 % 26; 1000]);
    }

    #[test]
    fn what_is_not_http2_passes_untouched_and_a_broken_stream_is_refused() {
        for input in [&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], b"PRI * HTTP/1.1"] {
            let mut out = Vec::new();
            Rewriter::default().feed(input, &mut out).unwrap();
            assert_eq!(out, input);
        }
        let refused = |frames: &[Vec<u8>]| {
            let mut input = PREFACE.to_vec();
            for f in frames {
                input.extend_from_slice(f);
            }
            Rewriter::default()
                .feed(&input, &mut Vec::new())
                .unwrap_err()
        };
        let open = frame(HEADERS, 0, 1, &[0x82]);
        assert!(refused(&[open.clone(), SETTINGS.to_vec()])
            .0
            .contains("inside a header block"));
        assert!(
            refused(&[open.clone(), frame(CONTINUATION, END_HEADERS, 3, &[])])
                .0
                .contains("out of place")
        );
        assert!(refused(&[frame(CONTINUATION, END_HEADERS, 1, &[])])
            .0
            .contains("out of place"));
        assert!(
            refused(&[frame(HEADERS, END_HEADERS | PADDED, 1, &[9, 0x82])])
                .0
                .contains("padding")
        );
        assert!(refused(&[frame(HEADERS, END_HEADERS, 1, &[0x80])])
            .0
            .contains("index 0"));
        let huge = [0x10, 0, 1, HEADERS, 0, 0, 0, 0, 1];
        assert!(refused(&[huge.to_vec()]).0.contains("header frame of"));
    }
}
