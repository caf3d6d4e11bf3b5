//! HTTP/1.1 on the wire, for the CA client: writing a request, reading a response; no I/O here.

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{request, response, Method, StatusCode, Version};

/// Longest response head (status line and headers), and longest trailer section, accepted.
pub(super) const MAX_HEAD: usize = 64 * 1024;
/// Longest response body accepted: ACME answers are small JSON documents and
/// certificate chains of a few KiB.
pub(super) const MAX_BODY: usize = 1024 * 1024;
/// Longest chunk-size line (with extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;

/// The request's bytes: request line, `Host`, the caller's headers, framing, body.
///
/// The caller's own `Host`, `Content-Length`, `Transfer-Encoding` and
/// `Connection` are replaced: the framing is ours (one request per connection).
pub(super) fn encode_request(parts: &request::Parts, body: &[u8]) -> Result<Vec<u8>, String> {
    let uri = &parts.uri;
    let host = uri.host().ok_or("the URL has no host")?;
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(format!("{} {target} HTTP/1.1\r\nHost: {host}", parts.method).as_bytes());
    if let Some(port) = uri.port_u16() {
        out.extend_from_slice(format!(":{port}").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if [HOST, CONTENT_LENGTH, TRANSFER_ENCODING, CONNECTION].contains(name) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // RFC 9110 section 8.6: no Content-Length on a GET or HEAD without content.
    if !body.is_empty() || !matches!(parts.method, Method::GET | Method::HEAD) {
        out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"connection: close\r\n\r\n");
    out.extend_from_slice(body);
    Ok(out)
}

/// How the end of the body is known (RFC 9112 section 6.3).
#[derive(Debug)]
enum Framing {
    /// This many bytes still to come.
    Length(usize),
    Chunked(Chunk),
    /// Until the server closes the connection.
    Eof,
    /// Complete.
    Done,
}

/// Where a chunked body decoder stands.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes still to come.
    Data(usize),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines (ignored) until an empty line;
    /// the count is the trailer bytes seen so far.
    Trailers(usize),
}

/// Reads one response from the bytes as they arrive.
#[derive(Debug)]
pub(super) struct ResponseReader {
    /// The request was HEAD: the response has no body whatever its headers say.
    head_request: bool,
    /// Received bytes not yet consumed.
    pending: Vec<u8>,
    /// The head, once read, and the body so far.
    head: Option<response::Parts>,
    body: Vec<u8>,
    framing: Framing,
}

impl ResponseReader {
    pub(super) fn new(method: &Method) -> ResponseReader {
        ResponseReader {
            head_request: method == Method::HEAD,
            pending: Vec::new(),
            head: None,
            body: Vec::new(),
            framing: Framing::Eof,
        }
    }

    /// Takes the next bytes from the connection; true once the response is complete.
    /// Bytes after the end of the response are ignored.
    pub(super) fn feed(&mut self, data: &[u8]) -> Result<bool, String> {
        self.pending.extend_from_slice(data);
        while self.head.is_none() {
            let Some((parts, len)) = parse_head(&self.pending)? else {
                return Ok(false);
            };
            self.pending.drain(..len);
            // An interim (1xx) response is followed by the real one.
            if parts.status.is_informational() {
                continue;
            }
            self.framing = if self.head_request
                || parts.status == StatusCode::NO_CONTENT
                || parts.status == StatusCode::NOT_MODIFIED
            {
                Framing::Done
            } else {
                framing(&parts.headers)?
            };
            self.head = Some(parts);
        }
        let consumed = self.body_bytes()?;
        self.pending.drain(..consumed);
        if self.body.len() > MAX_BODY {
            return Err(format!("the response body is over {MAX_BODY} bytes"));
        }
        Ok(matches!(self.framing, Framing::Done))
    }

    /// Moves body bytes from `pending` into `body`; returns how many bytes of `pending` it used.
    fn body_bytes(&mut self) -> Result<usize, String> {
        let input = &self.pending[..];
        match &mut self.framing {
            Framing::Done => Ok(0),
            Framing::Eof => {
                self.body.extend_from_slice(input);
                Ok(input.len())
            }
            Framing::Length(left) => {
                let n = (*left).min(input.len());
                self.body.extend_from_slice(&input[..n]);
                *left -= n;
                if *left == 0 {
                    self.framing = Framing::Done;
                }
                Ok(n)
            }
            Framing::Chunked(state) => {
                let (used, done) = decode_chunked(state, input, &mut self.body)?;
                if done {
                    self.framing = Framing::Done;
                }
                Ok(used)
            }
        }
    }

    /// The connection has ended (with TLS close_notify or without): the
    /// response, if it was complete. A body framed by the end of the
    /// connection is complete only if the end was a close_notify.
    pub(super) fn finish(self, close_notify: bool) -> Result<(response::Parts, Bytes), String> {
        let Some(parts) = self.head else {
            return Err(if self.pending.is_empty() {
                "the server closed the connection without answering".to_string()
            } else {
                "the server closed the connection in the middle of the response head".to_string()
            });
        };
        match self.framing {
            Framing::Done => Ok((parts, Bytes::from(self.body))),
            Framing::Eof if close_notify => Ok((parts, Bytes::from(self.body))),
            Framing::Eof => Err(
                "the server closed the connection without TLS close_notify before a body framed by the end of the connection: it may be cut short".to_string(),
            ),
            Framing::Length(left) => Err(format!(
                "the server closed the connection {left} bytes before the end of the body"
            )),
            Framing::Chunked(_) => Err(
                "the server closed the connection before the end of the chunked body".to_string(),
            ),
        }
    }
}

/// The body's framing from the response headers.
fn framing(headers: &http::HeaderMap) -> Result<Framing, String> {
    // Transfer-Encoding overrides Content-Length; a body whose last coding is
    // not chunked runs to the end of the connection.
    let codings: Vec<&[u8]> = headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty())
        .collect();
    if let Some(last) = codings.last() {
        return Ok(if last.eq_ignore_ascii_case(b"chunked") {
            Framing::Chunked(Chunk::Size)
        } else {
            Framing::Eof
        });
    }
    let mut length = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        for v in value.as_bytes().split(|&b| b == b',') {
            let v = std::str::from_utf8(v.trim_ascii()).unwrap_or("");
            let n = v
                .parse::<u64>()
                .ok()
                .filter(|_| v.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| format!("the response has an invalid Content-Length {v:?}"))?;
            if length.is_some_and(|l| l != n) {
                return Err("the response has conflicting Content-Length headers".to_string());
            }
            length = Some(n);
        }
    }
    match length {
        None => Ok(Framing::Eof),
        Some(0) => Ok(Framing::Done),
        Some(n) if n > MAX_BODY as u64 => Err(format!(
            "the response body is {n} bytes, over the limit of {MAX_BODY}"
        )),
        // Fits: n <= MAX_BODY.
        Some(n) => Ok(Framing::Length(n as usize)),
    }
}

/// The next line of `buf` from `start`, without its line ending (CRLF, or a
/// lone LF as RFC 9112 section 2.2 allows), and where the following line starts.
fn line(buf: &[u8], start: usize) -> Option<(&[u8], usize)> {
    let rest = &buf[start..];
    let lf = rest.iter().position(|&b| b == b'\n')?;
    let text = &rest[..lf];
    Some((text.strip_suffix(b"\r").unwrap_or(text), start + lf + 1))
}

/// Status line and headers, once the whole head is in `buf`, with its length.
fn parse_head(buf: &[u8]) -> Result<Option<(response::Parts, usize)>, String> {
    let incomplete = || {
        if buf.len() > MAX_HEAD {
            Err(format!("the response head is over {MAX_HEAD} bytes"))
        } else {
            Ok(None)
        }
    };
    let Some((status_line, mut pos)) = line(buf, 0) else {
        return incomplete();
    };
    let mut rsp = parse_status_line(status_line)?;
    loop {
        let Some((text, next)) = line(buf, pos) else {
            return incomplete();
        };
        if next > MAX_HEAD {
            return Err(format!("the response head is over {MAX_HEAD} bytes"));
        }
        pos = next;
        if text.is_empty() {
            break;
        }
        let (name, value) = parse_header(text)?;
        rsp = rsp.header(name, value);
    }
    let parts = rsp
        .body(())
        .map_err(|e| format!("the response head is invalid ({e})"))?
        .into_parts()
        .0;
    Ok(Some((parts, pos)))
}

/// `HTTP/1.1 200 OK` into a response builder with that version and status.
fn parse_status_line(text: &[u8]) -> Result<http::response::Builder, String> {
    let bad = || {
        format!(
            "the server did not answer with HTTP/1.x (status line {:?})",
            String::from_utf8_lossy(&text[..text.len().min(80)])
        )
    };
    let mut fields = text.splitn(3, |&b| b == b' ');
    let version = match fields.next() {
        Some(b"HTTP/1.1") => Version::HTTP_11,
        Some(b"HTTP/1.0") => Version::HTTP_10,
        _ => return Err(bad()),
    };
    let code = fields.next().ok_or_else(bad)?;
    if code.len() != 3 {
        return Err(bad());
    }
    let status = StatusCode::from_bytes(code).map_err(|_| bad())?;
    Ok(http::Response::builder().version(version).status(status))
}

/// `Name: value` with the value's surrounding whitespace removed.
fn parse_header(text: &[u8]) -> Result<(http::HeaderName, http::HeaderValue), String> {
    let bad = |why: &str| {
        format!(
            "the response has an invalid header line {:?} ({why})",
            String::from_utf8_lossy(&text[..text.len().min(80)])
        )
    };
    if text.starts_with(b" ") || text.starts_with(b"\t") {
        return Err(bad("obsolete line folding"));
    }
    let colon = text
        .iter()
        .position(|&b| b == b':')
        .ok_or_else(|| bad("no colon"))?;
    let name = http::HeaderName::from_bytes(&text[..colon]).map_err(|_| bad("invalid name"))?;
    let value = http::HeaderValue::from_bytes(text[colon + 1..].trim_ascii())
        .map_err(|_| bad("invalid value"))?;
    Ok((name, value))
}

/// Decodes as much of a chunked body (RFC 9112 section 7.1) as `input` holds,
/// appending the data to `body`. Returns how many bytes of `input` were used
/// and whether the body is complete; an incomplete line is left for later.
fn decode_chunked(
    state: &mut Chunk,
    input: &[u8],
    body: &mut Vec<u8>,
) -> Result<(usize, bool), String> {
    let mut pos = 0;
    loop {
        match *state {
            Chunk::Size => {
                let Some((text, next)) = line(input, pos) else {
                    if input.len() - pos > MAX_CHUNK_LINE {
                        return Err(format!("a chunk-size line is over {MAX_CHUNK_LINE} bytes"));
                    }
                    return Ok((pos, false));
                };
                pos = next;
                *state = match parse_chunk_size(text)? {
                    0 => Chunk::Trailers(0),
                    n if n > MAX_BODY.saturating_sub(body.len()) => {
                        return Err(format!("the response body is over {MAX_BODY} bytes"))
                    }
                    n => Chunk::Data(n),
                };
            }
            Chunk::Data(left) => {
                let n = left.min(input.len() - pos);
                body.extend_from_slice(&input[pos..pos + n]);
                pos += n;
                if n < left {
                    *state = Chunk::Data(left - n);
                    return Ok((pos, false));
                }
                *state = Chunk::DataEnd;
            }
            Chunk::DataEnd => {
                let Some((text, next)) = line(input, pos) else {
                    // A CRLF is two bytes: anything longer without a LF is wrong.
                    if input.len() - pos >= 2 {
                        return Err("a chunk's data is not followed by CRLF".to_string());
                    }
                    return Ok((pos, false));
                };
                if !text.is_empty() {
                    return Err("a chunk's data is not followed by CRLF".to_string());
                }
                pos = next;
                *state = Chunk::Size;
            }
            Chunk::Trailers(seen) => {
                let Some((text, next)) = line(input, pos) else {
                    if seen + input.len() - pos > MAX_HEAD {
                        return Err(format!("the response trailers are over {MAX_HEAD} bytes"));
                    }
                    return Ok((pos, false));
                };
                let seen = seen + (next - pos);
                if seen > MAX_HEAD {
                    return Err(format!("the response trailers are over {MAX_HEAD} bytes"));
                }
                pos = next;
                if text.is_empty() {
                    return Ok((pos, true));
                }
                *state = Chunk::Trailers(seen);
            }
        }
    }
}

/// The hexadecimal size at the start of a chunk-size line, before any `;extension`.
fn parse_chunk_size(text: &[u8]) -> Result<usize, String> {
    let bad = || {
        format!(
            "the response has an invalid chunk-size line {:?}",
            String::from_utf8_lossy(&text[..text.len().min(80)])
        )
    };
    let end = text.iter().position(|&b| b == b';').unwrap_or(text.len());
    let digits = text[..end].trim_ascii();
    if digits.is_empty() || digits.len() > 15 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(bad());
    }
    let digits = std::str::from_utf8(digits).map_err(|_| bad())?;
    usize::from_str_radix(digits, 16).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(method: Method, pieces: &[&[u8]]) -> Result<(response::Parts, Bytes), String> {
        let mut r = ResponseReader::new(&method);
        for p in pieces {
            if r.feed(p)? {
                break;
            }
        }
        r.finish(true)
    }

    fn one_byte_at_a_time(input: &[u8]) -> Vec<&[u8]> {
        input.chunks(1).collect()
    }

    #[test]
    fn request_line_host_headers_and_length() {
        let (parts, ()) = http::Request::builder()
            .method(Method::POST)
            .uri("https://ca.example.org:14000/acme/new-order?x=1")
            .header("content-type", "application/jose+json")
            .header("host", "ignored.example")
            .header("connection", "keep-alive")
            .body(())
            .unwrap()
            .into_parts();
        let out = encode_request(&parts, b"{}").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /acme/new-order?x=1 HTTP/1.1\r\nHost: ca.example.org:14000\r\n\
             content-type: application/jose+json\r\ncontent-length: 2\r\n\
             connection: close\r\n\r\n{}"
        );
    }

    #[test]
    fn get_without_body_has_no_content_length_and_root_path() {
        let (parts, ()) = http::Request::builder()
            .uri("https://ca.example.org")
            .body(())
            .unwrap()
            .into_parts();
        let out = String::from_utf8(encode_request(&parts, b"").unwrap()).unwrap();
        assert_eq!(
            out,
            "GET / HTTP/1.1\r\nHost: ca.example.org\r\nconnection: close\r\n\r\n"
        );
    }

    #[test]
    fn content_length_body_and_headers() {
        let raw = b"HTTP/1.1 201 Created\r\nReplay-Nonce: abc\r\nLink: <a>;rel=\"up\"\r\n\
                    Link: <b>;rel=\"up\"\r\nContent-Length:  5 \r\n\r\nhello";
        let (parts, body) = read_all(Method::POST, &[raw]).unwrap();
        assert_eq!(parts.status, StatusCode::CREATED);
        assert_eq!(parts.version, Version::HTTP_11);
        assert_eq!(parts.headers["replay-nonce"], "abc");
        assert_eq!(parts.headers.get_all("link").iter().count(), 2);
        assert_eq!(&body[..], b"hello");
    }

    #[test]
    fn content_length_complete_without_waiting_for_close() {
        let mut r = ResponseReader::new(&Method::GET);
        assert!(!r
            .feed(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
            .unwrap());
        // Complete once the last byte is in; later bytes are ignored.
        assert!(r.feed(b"cdEXTRA").unwrap());
        assert_eq!(&r.finish(true).unwrap().1[..], b"abcd");
    }

    #[test]
    fn split_reads_give_the_same_response() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc";
        let (parts, body) = read_all(Method::GET, &one_byte_at_a_time(raw)).unwrap();
        assert_eq!(parts.headers["content-length"], "3");
        assert_eq!(&body[..], b"abc");
    }

    #[test]
    fn truncated_content_length_body_is_an_error() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc";
        let err = read_all(Method::GET, &[raw]).unwrap_err();
        assert!(err.contains("7 bytes before the end"), "{err}");
    }

    #[test]
    fn body_to_eof_without_length() {
        let raw = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nto the end";
        let (parts, body) = read_all(Method::GET, &[raw]).unwrap();
        assert_eq!(parts.version, Version::HTTP_10);
        assert_eq!(&body[..], b"to the end");
    }

    #[test]
    fn body_to_eof_needs_close_notify_but_a_framed_body_does_not() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"a\":1}";
        let mut r = ResponseReader::new(&Method::GET);
        assert!(!r.feed(raw).unwrap());
        let err = r.finish(false).unwrap_err();
        assert!(err.contains("without TLS close_notify"), "{err}");
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{\"a\":1}";
        let mut r = ResponseReader::new(&Method::GET);
        assert!(r.feed(raw).unwrap());
        assert_eq!(&r.finish(false).unwrap().1[..], b"{\"a\":1}");
    }

    #[test]
    fn head_and_no_content_have_no_body() {
        let raw = b"HTTP/1.1 200 OK\r\nReplay-Nonce: n\r\nContent-Length: 120\r\n\r\n";
        let mut r = ResponseReader::new(&Method::HEAD);
        assert!(r.feed(raw).unwrap());
        assert!(r.finish(true).unwrap().1.is_empty());
        let mut r = ResponseReader::new(&Method::GET);
        assert!(r.feed(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap());
    }

    #[test]
    fn interim_response_is_skipped() {
        let raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let (parts, body) = read_all(Method::POST, &[raw]).unwrap();
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(&body[..], b"ok");
    }

    #[test]
    fn lone_lf_line_endings_are_accepted() {
        let raw = b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok";
        assert_eq!(&read_all(Method::GET, &[raw]).unwrap().1[..], b"ok");
    }

    const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
        5;name=value\r\nhello\r\n7 ; ext=\"quoted;\"\r\n, world\r\n\
        0\r\nExpires: never\r\nX-Trailer: ignored\r\n\r\n";

    #[test]
    fn chunked_with_extensions_and_trailers() {
        let (parts, body) = read_all(Method::GET, &[CHUNKED]).unwrap();
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(&body[..], b"hello, world");
    }

    #[test]
    fn chunked_split_at_every_byte() {
        let mut r = ResponseReader::new(&Method::GET);
        let mut done_at = None;
        for (i, b) in CHUNKED.iter().enumerate() {
            if r.feed(std::slice::from_ref(b)).unwrap() {
                done_at = Some(i);
                break;
            }
        }
        assert_eq!(
            done_at,
            Some(CHUNKED.len() - 1),
            "complete at the last byte"
        );
        assert_eq!(&r.finish(true).unwrap().1[..], b"hello, world");
    }

    #[test]
    fn chunked_wins_over_content_length_and_handles_hex() {
        let raw =
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\ntransfer-encoding: gzip, Chunked\r\n\r\n\
                    A\r\n0123456789\r\n0\r\n\r\n";
        assert_eq!(&read_all(Method::GET, &[raw]).unwrap().1[..], b"0123456789");
    }

    #[test]
    fn chunked_errors() {
        let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        for (body, want) in [
            ("zz\r\n", "invalid chunk-size line"),
            ("\r\n", "invalid chunk-size line"),
            ("3\r\nabcX\r\n", "not followed by CRLF"),
            ("3\r\nabc\r\n", "before the end of the chunked body"),
            ("fffffffffffffffff\r\n", "invalid chunk-size line"),
        ] {
            let err = read_all(Method::GET, &[format!("{head}{body}").as_bytes()]).unwrap_err();
            assert!(err.contains(want), "{body:?}: {err}");
        }
    }

    #[test]
    fn oversized_inputs_are_refused() {
        let huge_header = format!("HTTP/1.1 200 OK\r\nX: {}\r\n", "a".repeat(MAX_HEAD));
        let err = read_all(Method::GET, &[huge_header.as_bytes()]).unwrap_err();
        assert!(err.contains("response head is over"), "{err}");

        let endless = vec![b'a'; MAX_HEAD + 1];
        let err = read_all(Method::GET, &[&endless]).unwrap_err();
        assert!(err.contains("response head is over"), "{err}");

        let raw = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        let err = read_all(Method::GET, &[raw.as_bytes()]).unwrap_err();
        assert!(err.contains("over the limit"), "{err}");

        let raw = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
            MAX_BODY + 1
        );
        let err = read_all(Method::GET, &[raw.as_bytes()]).unwrap_err();
        assert!(err.contains("body is over"), "{err}");

        let mut r = ResponseReader::new(&Method::GET);
        r.feed(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
        let err = r.feed(&vec![b'x'; MAX_BODY + 1]).unwrap_err();
        assert!(err.contains("body is over"), "{err}");
    }

    #[test]
    fn bad_heads_are_refused() {
        for (raw, want) in [
            ("SSH-2.0-OpenSSH\r\n\r\n", "did not answer with HTTP/1.x"),
            ("HTTP/2 200\r\n\r\n", "did not answer with HTTP/1.x"),
            ("HTTP/1.1 20 OK\r\n\r\n", "did not answer with HTTP/1.x"),
            ("HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n", "no colon"),
            (
                "HTTP/1.1 200 OK\r\nA: b\r\n folded\r\n\r\n",
                "obsolete line folding",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                "invalid Content-Length",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\n",
                "invalid Content-Length",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                "conflicting Content-Length",
            ),
        ] {
            let err = read_all(Method::GET, &[raw.as_bytes()]).unwrap_err();
            assert!(err.contains(want), "{raw:?}: {err}");
        }
    }

    #[test]
    fn status_line_reason_is_optional() {
        let (parts, _) =
            read_all(Method::GET, &[b"HTTP/1.1 503\r\nContent-Length: 0\r\n\r\n"]).unwrap();
        assert_eq!(parts.status, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn closed_before_any_answer() {
        let err = read_all(Method::GET, &[]).unwrap_err();
        assert!(err.contains("without answering"), "{err}");
        let err = read_all(Method::GET, &[b"HTTP/1.1 200 OK\r\n"]).unwrap_err();
        assert!(err.contains("middle of the response head"), "{err}");
    }
}
