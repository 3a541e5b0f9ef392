//! HPACK (RFC 7541), as much as the CSI socket's `:authority` repair needs ([`super::authority`]):
//! a decoder of the header blocks a client sends (the static table, the dynamic table the
//! client's encoder keeps in step with it, Huffman-coded strings) and an encoder that writes
//! each field as a literal that enters no table, so the server's decoder never holds anything
//! this side must track.
//!
//! Pure: bytes in, fields or bytes out. The tables are the RFC's (Appendices A and B).

use std::collections::VecDeque;
use std::sync::OnceLock;

/// A header block that does not decode: the connection cannot go on (COMPRESSION_ERROR).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed header block: {}", self.0)
    }
}

impl std::error::Error for Malformed {}

/// One header field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
    /// Sent as never-indexed (a credential): passed on as never-indexed.
    pub sensitive: bool,
}

impl Field {
    #[cfg(test)]
    pub fn new(name: &str, value: &str) -> Field {
        Field {
            name: name.into(),
            value: value.into(),
            sensitive: false,
        }
    }
}

/// The dynamic table's size when the server has said nothing else (SETTINGS_HEADER_TABLE_SIZE's
/// initial value; the plugin's server never changes it).
pub const DEFAULT_TABLE_SIZE: usize = 4096;

/// A decoder of one connection's header blocks, in order.
#[derive(Debug)]
pub struct Decoder {
    /// Newest first.
    table: VecDeque<(Vec<u8>, Vec<u8>)>,
    size: usize,
    max_size: usize,
    /// The largest size the client may set (what the server allows).
    limit: usize,
}

impl Decoder {
    pub fn new(limit: usize) -> Decoder {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max_size: limit,
            limit,
        }
    }

    /// The fields of one whole header block.
    pub fn decode(&mut self, block: &[u8]) -> Result<Vec<Field>, Malformed> {
        let mut fields = Vec::new();
        let mut at = 0;
        while at < block.len() {
            let b = block[at];
            if b & 0x80 != 0 {
                // Indexed field.
                let i = integer(block, &mut at, 7)?;
                let (name, value) = self.entry(i)?;
                fields.push(Field {
                    name,
                    value,
                    sensitive: false,
                });
            } else if b & 0xe0 == 0x20 {
                // Dynamic table size update.
                let size = integer(block, &mut at, 5)?;
                if size > self.limit {
                    return Err(Malformed("table size update over the allowed size"));
                }
                self.max_size = size;
                self.evict(0);
            } else {
                // Literal: with incremental indexing (01), never indexed (0001), or without (0000).
                let (prefix, indexing, sensitive) = match b {
                    _ if b & 0xc0 == 0x40 => (6, true, false),
                    _ if b & 0xf0 == 0x10 => (4, false, true),
                    _ => (4, false, false),
                };
                let i = integer(block, &mut at, prefix)?;
                let name = match i {
                    0 => string(block, &mut at)?,
                    i => self.entry(i)?.0,
                };
                let value = string(block, &mut at)?;
                if indexing {
                    self.insert(name.clone(), value.clone());
                }
                fields.push(Field {
                    name,
                    value,
                    sensitive,
                });
            }
        }
        Ok(fields)
    }

    fn entry(&self, i: usize) -> Result<(Vec<u8>, Vec<u8>), Malformed> {
        match i {
            0 => Err(Malformed("index 0")),
            1..=61 => {
                let (n, v) = STATIC[i - 1];
                Ok((n.into(), v.into()))
            }
            _ => self
                .table
                .get(i - 62)
                .cloned()
                .ok_or(Malformed("index past the dynamic table")),
        }
    }

    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let size = entry_size(&name, &value);
        self.evict(size);
        if size <= self.max_size {
            self.size += size;
            self.table.push_front((name, value));
        }
    }

    /// Evicts the oldest entries until `room` more bytes fit (all of them if it never does).
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max_size {
            match self.table.pop_back() {
                Some((n, v)) => self.size -= entry_size(&n, &v),
                None => break,
            }
        }
    }
}

fn entry_size(name: &[u8], value: &[u8]) -> usize {
    name.len() + value.len() + 32
}

/// An integer with an N-bit prefix (RFC 7541 5.1), at most 2^28 + prefix: far past any size a
/// header block or table can have.
fn integer(block: &[u8], at: &mut usize, prefix: u8) -> Result<usize, Malformed> {
    let short = Malformed("the block ends inside an integer");
    let mask = (1usize << prefix) - 1;
    let mut value = usize::from(*block.get(*at).ok_or(short.clone())?) & mask;
    *at += 1;
    if value < mask {
        return Ok(value);
    }
    let mut shift = 0;
    loop {
        let b = *block.get(*at).ok_or(short.clone())?;
        *at += 1;
        value += usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(value);
        }
        shift += 7;
        if shift > 21 {
            return Err(Malformed("an integer too large"));
        }
    }
}

/// A string literal (RFC 7541 5.2), Huffman-coded or not.
fn string(block: &[u8], at: &mut usize) -> Result<Vec<u8>, Malformed> {
    let huffman = block.get(*at).is_some_and(|b| b & 0x80 != 0);
    let len = integer(block, at, 7)?;
    let bytes = block
        .get(*at..*at + len)
        .ok_or(Malformed("the block ends inside a string"))?;
    *at += len;
    if huffman {
        huffman_decode(bytes)
    } else {
        Ok(bytes.to_vec())
    }
}

/// The Huffman code as a binary tree: `[child for 0, child for 1]` per node, the root first; a
/// child is a node's index, or [`LEAF`] | symbol (0 is never a child: it is the root).
fn tree() -> &'static [[u16; 2]] {
    static TREE: OnceLock<Vec<[u16; 2]>> = OnceLock::new();
    TREE.get_or_init(|| {
        let mut nodes = vec![[0u16; 2]];
        for (sym, &(bits, code)) in HUFFMAN.iter().enumerate() {
            let mut node = 0;
            for i in (0..bits).rev() {
                let bit = ((code >> i) & 1) as usize;
                if i == 0 {
                    nodes[node][bit] = LEAF | sym as u16;
                } else {
                    if nodes[node][bit] == 0 {
                        nodes.push([0; 2]);
                        nodes[node][bit] = (nodes.len() - 1) as u16;
                    }
                    node = usize::from(nodes[node][bit]);
                }
            }
        }
        nodes
    })
}

const LEAF: u16 = 0x8000;
const EOS: u16 = 256;

fn huffman_decode(bytes: &[u8]) -> Result<Vec<u8>, Malformed> {
    let tree = tree();
    let mut out = Vec::with_capacity(bytes.len() * 8 / 5);
    let (mut node, mut pending, mut all_ones) = (0usize, 0, true);
    for byte in bytes {
        for i in (0..8).rev() {
            let bit = (byte >> i) & 1;
            let next = tree[node][usize::from(bit)];
            if next & LEAF != 0 {
                let sym = next & !LEAF;
                if sym == EOS {
                    return Err(Malformed("EOS inside a Huffman string"));
                }
                out.push(sym as u8);
                (node, pending, all_ones) = (0, 0, true);
            } else if next == 0 {
                return Err(Malformed("an invalid Huffman code"));
            } else {
                node = usize::from(next);
                pending += 1;
                all_ones &= bit == 1;
            }
        }
    }
    // What is left is padding: fewer than 8 bits, all ones (a prefix of EOS).
    if pending > 7 || !all_ones {
        return Err(Malformed("bad padding after a Huffman string"));
    }
    Ok(out)
}

/// Appends `fields` as one header block: each a literal with its name written out, never
/// entering a table (never-indexed when it came so).
pub fn encode(fields: &[Field], out: &mut Vec<u8>) {
    for f in fields {
        out.push(if f.sensitive { 0x10 } else { 0x00 });
        for s in [&f.name, &f.value] {
            encode_integer(s.len(), 7, out);
            out.extend_from_slice(s);
        }
    }
}

/// An integer with an N-bit prefix, the other bits of the first byte 0.
fn encode_integer(mut value: usize, prefix: u8, out: &mut Vec<u8>) {
    let mask = (1usize << prefix) - 1;
    if value < mask {
        out.push(value as u8);
        return;
    }
    out.push(mask as u8);
    value -= mask;
    while value >= 0x80 {
        out.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// RFC 7541 Appendix A.
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// RFC 7541 Appendix B: (bits, code) of each symbol, EOS (256) last.
const HUFFMAN: [(u8, u32); 257] = [
    (13, 0x1ff8),
    (23, 0x7fffd8),
    (28, 0xfffffe2),
    (28, 0xfffffe3),
    (28, 0xfffffe4),
    (28, 0xfffffe5),
    (28, 0xfffffe6),
    (28, 0xfffffe7),
    (28, 0xfffffe8),
    (24, 0xffffea),
    (30, 0x3ffffffc),
    (28, 0xfffffe9),
    (28, 0xfffffea),
    (30, 0x3ffffffd),
    (28, 0xfffffeb),
    (28, 0xfffffec),
    (28, 0xfffffed),
    (28, 0xfffffee),
    (28, 0xfffffef),
    (28, 0xffffff0),
    (28, 0xffffff1),
    (28, 0xffffff2),
    (30, 0x3ffffffe),
    (28, 0xffffff3),
    (28, 0xffffff4),
    (28, 0xffffff5),
    (28, 0xffffff6),
    (28, 0xffffff7),
    (28, 0xffffff8),
    (28, 0xffffff9),
    (28, 0xffffffa),
    (28, 0xffffffb),
    (6, 0x14),
    (10, 0x3f8),
    (10, 0x3f9),
    (12, 0xffa),
    (13, 0x1ff9),
    (6, 0x15),
    (8, 0xf8),
    (11, 0x7fa),
    (10, 0x3fa),
    (10, 0x3fb),
    (8, 0xf9),
    (11, 0x7fb),
    (8, 0xfa),
    (6, 0x16),
    (6, 0x17),
    (6, 0x18),
    (5, 0x0),
    (5, 0x1),
    (5, 0x2),
    (6, 0x19),
    (6, 0x1a),
    (6, 0x1b),
    (6, 0x1c),
    (6, 0x1d),
    (6, 0x1e),
    (6, 0x1f),
    (7, 0x5c),
    (8, 0xfb),
    (15, 0x7ffc),
    (6, 0x20),
    (12, 0xffb),
    (10, 0x3fc),
    (13, 0x1ffa),
    (6, 0x21),
    (7, 0x5d),
    (7, 0x5e),
    (7, 0x5f),
    (7, 0x60),
    (7, 0x61),
    (7, 0x62),
    (7, 0x63),
    (7, 0x64),
    (7, 0x65),
    (7, 0x66),
    (7, 0x67),
    (7, 0x68),
    (7, 0x69),
    (7, 0x6a),
    (7, 0x6b),
    (7, 0x6c),
    (7, 0x6d),
    (7, 0x6e),
    (7, 0x6f),
    (7, 0x70),
    (7, 0x71),
    (7, 0x72),
    (8, 0xfc),
    (7, 0x73),
    (8, 0xfd),
    (13, 0x1ffb),
    (19, 0x7fff0),
    (13, 0x1ffc),
    (14, 0x3ffc),
    (6, 0x22),
    (15, 0x7ffd),
    (5, 0x3),
    (6, 0x23),
    (5, 0x4),
    (6, 0x24),
    (5, 0x5),
    (6, 0x25),
    (6, 0x26),
    (6, 0x27),
    (5, 0x6),
    (7, 0x74),
    (7, 0x75),
    (6, 0x28),
    (6, 0x29),
    (6, 0x2a),
    (5, 0x7),
    (6, 0x2b),
    (7, 0x76),
    (6, 0x2c),
    (5, 0x8),
    (5, 0x9),
    (6, 0x2d),
    (7, 0x77),
    (7, 0x78),
    (7, 0x79),
    (7, 0x7a),
    (7, 0x7b),
    (15, 0x7ffe),
    (11, 0x7fc),
    (14, 0x3ffd),
    (13, 0x1ffd),
    (28, 0xffffffc),
    (20, 0xfffe6),
    (22, 0x3fffd2),
    (20, 0xfffe7),
    (20, 0xfffe8),
    (22, 0x3fffd3),
    (22, 0x3fffd4),
    (22, 0x3fffd5),
    (23, 0x7fffd9),
    (22, 0x3fffd6),
    (23, 0x7fffda),
    (23, 0x7fffdb),
    (23, 0x7fffdc),
    (23, 0x7fffdd),
    (23, 0x7fffde),
    (24, 0xffffeb),
    (23, 0x7fffdf),
    (24, 0xffffec),
    (24, 0xffffed),
    (22, 0x3fffd7),
    (23, 0x7fffe0),
    (24, 0xffffee),
    (23, 0x7fffe1),
    (23, 0x7fffe2),
    (23, 0x7fffe3),
    (23, 0x7fffe4),
    (21, 0x1fffdc),
    (22, 0x3fffd8),
    (23, 0x7fffe5),
    (22, 0x3fffd9),
    (23, 0x7fffe6),
    (23, 0x7fffe7),
    (24, 0xffffef),
    (22, 0x3fffda),
    (21, 0x1fffdd),
    (20, 0xfffe9),
    (22, 0x3fffdb),
    (22, 0x3fffdc),
    (23, 0x7fffe8),
    (23, 0x7fffe9),
    (21, 0x1fffde),
    (23, 0x7fffea),
    (22, 0x3fffdd),
    (22, 0x3fffde),
    (24, 0xfffff0),
    (21, 0x1fffdf),
    (22, 0x3fffdf),
    (23, 0x7fffeb),
    (23, 0x7fffec),
    (21, 0x1fffe0),
    (21, 0x1fffe1),
    (22, 0x3fffe0),
    (21, 0x1fffe2),
    (23, 0x7fffed),
    (22, 0x3fffe1),
    (23, 0x7fffee),
    (23, 0x7fffef),
    (20, 0xfffea),
    (22, 0x3fffe2),
    (22, 0x3fffe3),
    (22, 0x3fffe4),
    (23, 0x7ffff0),
    (22, 0x3fffe5),
    (22, 0x3fffe6),
    (23, 0x7ffff1),
    (26, 0x3ffffe0),
    (26, 0x3ffffe1),
    (20, 0xfffeb),
    (19, 0x7fff1),
    (22, 0x3fffe7),
    (23, 0x7ffff2),
    (22, 0x3fffe8),
    (25, 0x1ffffec),
    (26, 0x3ffffe2),
    (26, 0x3ffffe3),
    (26, 0x3ffffe4),
    (27, 0x7ffffde),
    (27, 0x7ffffdf),
    (26, 0x3ffffe5),
    (24, 0xfffff1),
    (25, 0x1ffffed),
    (19, 0x7fff2),
    (21, 0x1fffe3),
    (26, 0x3ffffe6),
    (27, 0x7ffffe0),
    (27, 0x7ffffe1),
    (26, 0x3ffffe7),
    (27, 0x7ffffe2),
    (24, 0xfffff2),
    (21, 0x1fffe4),
    (21, 0x1fffe5),
    (26, 0x3ffffe8),
    (26, 0x3ffffe9),
    (28, 0xffffffd),
    (27, 0x7ffffe3),
    (27, 0x7ffffe4),
    (27, 0x7ffffe5),
    (20, 0xfffec),
    (24, 0xfffff3),
    (20, 0xfffed),
    (21, 0x1fffe6),
    (22, 0x3fffe9),
    (21, 0x1fffe7),
    (21, 0x1fffe8),
    (23, 0x7ffff3),
    (22, 0x3fffea),
    (22, 0x3fffeb),
    (25, 0x1ffffee),
    (25, 0x1ffffef),
    (24, 0xfffff4),
    (24, 0xfffff5),
    (26, 0x3ffffea),
    (23, 0x7ffff4),
    (26, 0x3ffffeb),
    (27, 0x7ffffe6),
    (26, 0x3ffffec),
    (26, 0x3ffffed),
    (27, 0x7ffffe7),
    (27, 0x7ffffe8),
    (27, 0x7ffffe9),
    (27, 0x7ffffea),
    (27, 0x7ffffeb),
    (28, 0xffffffe),
    (27, 0x7ffffec),
    (27, 0x7ffffed),
    (27, 0x7ffffee),
    (27, 0x7ffffef),
    (27, 0x7fffff0),
    (26, 0x3ffffee),
    (30, 0x3fffffff),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn fields(list: &[(&str, &str)]) -> Vec<Field> {
        list.iter().map(|(n, v)| Field::new(n, v)).collect()
    }

    /// RFC 7541 C.3 (plain strings) and C.4 (the same requests, Huffman-coded): three requests
    /// on one connection, each leaning on the dynamic table the ones before filled.
    #[test]
    fn decodes_the_rfc_examples_of_requests() {
        for blocks in [
            [
                "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
                "8286 84be 5808 6e6f 2d63 6163 6865",
                "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
            ],
            [
                "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
                "8286 84be 5886 a8eb 1064 9cbf",
                "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
            ],
        ] {
            let mut d = Decoder::new(DEFAULT_TABLE_SIZE);
            let base = [
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
            ];
            assert_eq!(d.decode(&hex(blocks[0])).unwrap(), fields(&base));
            assert_eq!(d.size, 57);
            let mut second = base.to_vec();
            second.push(("cache-control", "no-cache"));
            assert_eq!(d.decode(&hex(blocks[1])).unwrap(), fields(&second));
            assert_eq!(d.size, 110);
            assert_eq!(
                d.decode(&hex(blocks[2])).unwrap(),
                fields(&[
                    (":method", "GET"),
                    (":scheme", "https"),
                    (":path", "/index.html"),
                    (":authority", "www.example.com"),
                    ("custom-key", "custom-value"),
                ])
            );
            assert_eq!(d.size, 164);
        }
    }

    #[test]
    fn the_dynamic_table_evicts_the_oldest_and_follows_size_updates() {
        let mut d = Decoder::new(DEFAULT_TABLE_SIZE);
        // Room for two entries of 32 + 2 bytes: a third evicts the first.
        let mut block = vec![0x3f, 0x2d]; // size update to 76 (31 + 45)
        for (n, v) in [("a", "1"), ("b", "2"), ("c", "3")] {
            block.extend([0x40, 1, n.as_bytes()[0], 1, v.as_bytes()[0]]);
        }
        block.extend([0x80 | 62, 0x80 | 63]);
        let got = d.decode(&block).unwrap();
        assert_eq!(&got[3..], &fields(&[("c", "3"), ("b", "2")]));
        assert_eq!(
            d.decode(&[0x80 | 64]),
            Err(Malformed("index past the dynamic table"))
        );
        // Down to 0 empties it; past the allowed size is refused.
        d.decode(&[0x20]).unwrap();
        assert_eq!((d.table.len(), d.size), (0, 0));
        assert!(d.decode(&[0x3f, 0xe2, 0x1f]).is_err(), "4097 > 4096");
        d.decode(&[0x3f, 0xe1, 0x1f]).unwrap();
        // An entry larger than the table empties it and is not added.
        let mut d = Decoder::new(40);
        d.decode(&[0x40, 1, b'a', 1, b'1']).unwrap();
        d.decode(&[
            0x40, 1, b'b', 8, b'x', b'x', b'x', b'x', b'x', b'x', b'x', b'x',
        ])
        .unwrap();
        assert_eq!((d.table.len(), d.size), (0, 0));
    }

    #[test]
    fn never_indexed_fields_stay_so_and_nothing_else_enters_a_table() {
        let mut d = Decoder::new(DEFAULT_TABLE_SIZE);
        // Never indexed, name from the static table (authorization, 23); then without indexing.
        let got = d
            .decode(&[0x1f, 0x08, 3, b'k', b'e', b'y', 0x01, 1, b'h'])
            .unwrap();
        assert_eq!(
            got[0],
            Field {
                name: b"authorization".to_vec(),
                value: b"key".to_vec(),
                sensitive: true
            }
        );
        assert_eq!(got[1], Field::new(":authority", "h"));
        assert_eq!(d.size, 0);
        // Re-encoded, the same fields come back, and the decoder's table stays empty.
        let mut out = Vec::new();
        encode(&got, &mut out);
        assert_eq!(d.decode(&out).unwrap(), got);
        assert_eq!(d.size, 0);
    }

    #[test]
    fn encodes_integers_of_every_length() {
        for v in [
            0,
            1,
            126,
            127,
            128,
            255,
            16383,
            16384,
            1 << 20,
            (1 << 28) - 1,
        ] {
            let mut out = Vec::new();
            encode_integer(v, 7, &mut out);
            let mut at = 0;
            assert_eq!(integer(&out, &mut at, 7), Ok(v), "{v}: {out:x?}");
            assert_eq!(at, out.len());
        }
        // RFC 7541 C.1: 10 and 1337 with a 5-bit prefix.
        assert_eq!(integer(&[0x0a], &mut 0, 5), Ok(10));
        assert_eq!(integer(&[0x1f, 0x9a, 0x0a], &mut 0, 5), Ok(1337));
    }

    #[test]
    fn refuses_what_does_not_decode() {
        let mut d = Decoder::new(DEFAULT_TABLE_SIZE);
        for (block, why) in [
            (vec![0x80], "index 0"),
            (
                vec![0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
                "an integer too large",
            ),
            (vec![0x41, 0x05, b'a'], "the block ends inside a string"),
            (vec![0x41], "the block ends inside an integer"),
            // "a" is 00011 (5 bits); padding of zeros, and padding of a whole byte.
            (vec![0x41, 0x81, 0x18], "bad padding after a Huffman string"),
            (
                vec![0x41, 0x82, 0x1f, 0xff],
                "bad padding after a Huffman string",
            ),
            // EOS: 30 ones.
            (
                vec![0x41, 0x84, 0xff, 0xff, 0xff, 0xff],
                "EOS inside a Huffman string",
            ),
        ] {
            assert_eq!(d.decode(&block), Err(Malformed(why)), "{block:x?}");
        }
        // "a" padded with ones decodes.
        assert_eq!(
            d.decode(&[0x41, 0x81, 0x1f]).unwrap(),
            fields(&[(":authority", "a")])
        );
    }
}
