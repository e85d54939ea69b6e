//! The handshake: fixed newstyle option haggling as a pure state machine.
//!
//! [`Negotiator::next`] looks at the bytes received so far, consumes at most
//! one complete message, appends any reply to `out` and may report an
//! [`HsEvent`]. It never blocks and never trusts a length before checking
//! it against [`MAX_OPTION_LEN`], so it can be fed arbitrary bytes (the
//! fuzz test does).

use crate::proto::*;

/// Where the negotiator looks exports up.
pub trait Catalog {
    /// What a successful lookup hands back to the connection.
    type Export;
    /// The export called `name`, with its geometry and a description.
    fn find(&mut self, name: &str) -> Option<(Self::Export, Geometry, String)>;
    /// Names of every export, for `NBD_OPT_LIST`.
    fn names(&self) -> Vec<String>;
}

/// What a negotiation step asks the connection to do.
#[derive(Debug)]
pub enum HsEvent<E> {
    /// The handshake is over: serve `export` (the reply is already in `out`).
    Go {
        /// The catalog's export.
        export: E,
        /// Its geometry.
        geometry: Geometry,
    },
    /// The client aborted: send what is in `out`, then close.
    Abort,
    /// Protocol violation or refused client: close at once.
    Close(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ClientFlags,
    Options,
    Done,
}

/// Server side of the fixed newstyle handshake (after the greeting, see
/// [`greeting`]).
#[derive(Debug)]
pub struct Negotiator {
    state: State,
    no_zeroes: bool,
    options: u32,
}

impl Default for Negotiator {
    fn default() -> Self {
        Self::new()
    }
}

impl Negotiator {
    /// A negotiator waiting for the client flags.
    pub fn new() -> Negotiator {
        Negotiator {
            state: State::ClientFlags,
            no_zeroes: false,
            options: 0,
        }
    }

    /// True once an export was chosen or the session ended.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes at most one message from `input`; returns how many bytes
    /// it used and what to do. `(0, None)` means "need more bytes".
    pub fn next<C: Catalog>(
        &mut self,
        input: &[u8],
        cat: &mut C,
        out: &mut Vec<u8>,
    ) -> (usize, Option<HsEvent<C::Export>>) {
        match self.state {
            State::Done => (0, None),
            State::ClientFlags => {
                let Some(flags) = be32(input, 0) else {
                    return (0, None);
                };
                if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
                    return self.close(4, "unknown client flags");
                }
                if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
                    return self.close(4, "client does not speak fixed newstyle");
                }
                self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
                self.state = State::Options;
                (4, None)
            }
            State::Options => self.option(input, cat, out),
        }
    }

    fn close<E>(&mut self, used: usize, why: &'static str) -> (usize, Option<HsEvent<E>>) {
        self.state = State::Done;
        (used, Some(HsEvent::Close(why)))
    }

    fn option<C: Catalog>(
        &mut self,
        input: &[u8],
        cat: &mut C,
        out: &mut Vec<u8>,
    ) -> (usize, Option<HsEvent<C::Export>>) {
        let (Some(magic), Some(opt), Some(len)) = (be64(input, 0), be32(input, 8), be32(input, 12))
        else {
            return (0, None);
        };
        if magic != IHAVEOPT {
            return self.close(0, "bad option magic");
        }
        if len > MAX_OPTION_LEN {
            return self.close(0, "option too long");
        }
        let total = OPTION_HEADER_LEN + len as usize;
        let Some(data) = input.get(OPTION_HEADER_LEN..total) else {
            return (0, None);
        };
        self.options += 1;
        if self.options > MAX_OPTIONS {
            return self.close(total, "too many options");
        }
        let ev = match opt {
            OPT_EXPORT_NAME => self.export_name(data, cat, out),
            OPT_ABORT => {
                option_reply(out, opt, REP_ACK, &[]);
                self.state = State::Done;
                Some(HsEvent::Abort)
            }
            OPT_LIST => {
                if data.is_empty() {
                    for n in cat.names() {
                        let mut d = Vec::with_capacity(4 + n.len());
                        d.put_u32(n.len() as u32);
                        d.extend_from_slice(n.as_bytes());
                        option_reply(out, opt, REP_SERVER, &d);
                    }
                    option_reply(out, opt, REP_ACK, &[]);
                } else {
                    option_reply(out, opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
                }
                None
            }
            OPT_INFO | OPT_GO => self.info_go(opt, data, cat, out),
            OPT_STARTTLS => {
                option_reply(out, opt, REP_ERR_UNSUP, b"TLS is not supported");
                None
            }
            OPT_STRUCTURED_REPLY => {
                option_reply(out, opt, REP_ERR_UNSUP, b"structured replies not supported");
                None
            }
            _ => {
                option_reply(out, opt, REP_ERR_UNSUP, b"unsupported option");
                None
            }
        };
        (total, ev)
    }

    fn export_name<C: Catalog>(
        &mut self,
        data: &[u8],
        cat: &mut C,
        out: &mut Vec<u8>,
    ) -> Option<HsEvent<C::Export>> {
        self.state = State::Done;
        // This option has no error reply: an unknown export ends the session.
        let found = std::str::from_utf8(data).ok().and_then(|n| cat.find(n));
        let Some((export, geometry, _)) = found else {
            return Some(HsEvent::Close("NBD_OPT_EXPORT_NAME: no such export"));
        };
        out.put_u64(geometry.size);
        out.put_u16(geometry.transmission_flags());
        if !self.no_zeroes {
            out.extend_from_slice(&[0u8; 124]);
        }
        Some(HsEvent::Go { export, geometry })
    }

    fn info_go<C: Catalog>(
        &mut self,
        opt: u32,
        data: &[u8],
        cat: &mut C,
        out: &mut Vec<u8>,
    ) -> Option<HsEvent<C::Export>> {
        // Data: u32 name length, name, u16 request count, u16 requests.
        let parsed = (|| {
            let name_len = be32(data, 0)? as usize;
            let after_name = 4usize.checked_add(name_len)?;
            let name = data.get(4..after_name)?;
            let n = be16(data, after_name)? as usize;
            let reqs_at = after_name + 2;
            if data.len() != reqs_at.checked_add(n.checked_mul(2)?)? {
                return None;
            }
            let reqs: Vec<u16> = (0..n).filter_map(|i| be16(data, reqs_at + 2 * i)).collect();
            Some((name, reqs))
        })();
        let Some((name, reqs)) = parsed else {
            option_reply(out, opt, REP_ERR_INVALID, b"malformed NBD_OPT_INFO/GO");
            return None;
        };
        if name.len() > MAX_NAME_LEN {
            option_reply(out, opt, REP_ERR_INVALID, b"export name too long");
            return None;
        }
        let found = std::str::from_utf8(name).ok().and_then(|n| cat.find(n));
        let Some((export, geometry, description)) = found else {
            option_reply(out, opt, REP_ERR_UNKNOWN, b"no such export");
            return None;
        };
        let mut d = Vec::with_capacity(14);
        d.put_u16(INFO_EXPORT);
        d.put_u64(geometry.size);
        d.put_u16(geometry.transmission_flags());
        option_reply(out, opt, REP_INFO, &d);
        // Always sent: clients must honour the minimum block size.
        let (min, pref, max) = geometry.block_sizes();
        d.clear();
        d.put_u16(INFO_BLOCK_SIZE);
        d.put_u32(min);
        d.put_u32(pref);
        d.put_u32(max);
        option_reply(out, opt, REP_INFO, &d);
        if reqs.contains(&INFO_NAME) {
            d.clear();
            d.put_u16(INFO_NAME);
            d.extend_from_slice(name);
            option_reply(out, opt, REP_INFO, &d);
        }
        if reqs.contains(&INFO_DESCRIPTION) && !description.is_empty() {
            d.clear();
            d.put_u16(INFO_DESCRIPTION);
            d.extend_from_slice(&description.as_bytes()[..description.len().min(MAX_NAME_LEN)]);
            option_reply(out, opt, REP_INFO, &d);
        }
        option_reply(out, opt, REP_ACK, &[]);
        if opt == OPT_GO {
            self.state = State::Done;
            Some(HsEvent::Go { export, geometry })
        } else {
            None
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A catalog of fixed exports for parser tests.
    pub(crate) struct FakeCatalog(pub Vec<(String, Geometry)>);

    impl Catalog for FakeCatalog {
        type Export = String;
        fn find(&mut self, name: &str) -> Option<(String, Geometry, String)> {
            self.0
                .iter()
                .find(|(n, _)| n == name)
                .map(|(n, g)| (n.clone(), *g, format!("fake {n}")))
        }
        fn names(&self) -> Vec<String> {
            self.0.iter().map(|(n, _)| n.clone()).collect()
        }
    }

    pub(crate) fn geom() -> Geometry {
        Geometry {
            size: 1 << 20,
            block_size: 512,
            max_payload: MAX_PAYLOAD,
            readonly: false,
            flush: true,
            trim: true,
            write_zeroes: true,
        }
    }

    fn opt(o: u32, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.put_u64(IHAVEOPT);
        v.put_u32(o);
        v.put_u32(data.len() as u32);
        v.extend_from_slice(data);
        v
    }

    fn go_data(name: &str, reqs: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.put_u32(name.len() as u32);
        d.extend_from_slice(name.as_bytes());
        d.put_u16(reqs.len() as u16);
        for r in reqs {
            d.put_u16(*r);
        }
        d
    }

    /// Feeds `input` whole; returns the events and the bytes left.
    fn run(
        n: &mut Negotiator,
        cat: &mut FakeCatalog,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> (Vec<HsEvent<String>>, usize) {
        let mut pos = 0;
        let mut evs = Vec::new();
        loop {
            let (used, ev) = n.next(&input[pos..], cat, out);
            pos += used;
            let stop = used == 0 && ev.is_none();
            if let Some(e) = ev {
                evs.push(e);
            }
            if stop || n.is_done() {
                return (evs, input.len() - pos);
            }
        }
    }

    fn replies(out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        let mut p = 0;
        while p < out.len() {
            assert_eq!(be64(out, p), Some(OPT_REPLY_MAGIC));
            let o = be32(out, p + 8).unwrap();
            let t = be32(out, p + 12).unwrap();
            let l = be32(out, p + 16).unwrap() as usize;
            v.push((o, t, out[p + 20..p + 20 + l].to_vec()));
            p += 20 + l;
        }
        v
    }

    #[test]
    fn go_with_info_list_and_errors() {
        let mut cat = FakeCatalog(vec![("disk".into(), geom()), ("two".into(), geom())]);
        let mut n = Negotiator::new();
        let mut input = vec![0, 0, 0, 3];
        input.extend(opt(OPT_LIST, &[]));
        input.extend(opt(OPT_LIST, b"x"));
        input.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        input.extend(opt(99, b"junk"));
        input.extend(opt(OPT_INFO, &go_data("nope", &[])));
        input.extend(opt(OPT_INFO, b"\0\0\0\x09ab")); // name longer than data
        input.extend(opt(
            OPT_INFO,
            &go_data("disk", &[INFO_NAME, INFO_DESCRIPTION]),
        ));
        input.extend(opt(OPT_GO, &go_data("disk", &[INFO_BLOCK_SIZE])));
        input.extend([1, 2, 3]); // first bytes of the transmission phase
        let mut out = Vec::new();
        let (evs, left) = run(&mut n, &mut cat, &input, &mut out);
        assert_eq!(left, 3);
        assert!(matches!(&evs[..], [HsEvent::Go { export, .. }] if export == "disk"));
        let r = replies(&out);
        let types: Vec<(u32, u32)> = r.iter().map(|(o, t, _)| (*o, *t)).collect();
        assert_eq!(
            types,
            [
                (OPT_LIST, REP_SERVER),
                (OPT_LIST, REP_SERVER),
                (OPT_LIST, REP_ACK),
                (OPT_LIST, REP_ERR_INVALID),
                (OPT_STRUCTURED_REPLY, REP_ERR_UNSUP),
                (99, REP_ERR_UNSUP),
                (OPT_INFO, REP_ERR_UNKNOWN),
                (OPT_INFO, REP_ERR_INVALID),
                (OPT_INFO, REP_INFO),
                (OPT_INFO, REP_INFO),
                (OPT_INFO, REP_INFO),
                (OPT_INFO, REP_INFO),
                (OPT_INFO, REP_ACK),
                (OPT_GO, REP_INFO),
                (OPT_GO, REP_INFO),
                (OPT_GO, REP_ACK),
            ]
        );
        assert_eq!(&r[0].2[4..], b"disk");
        // INFO_EXPORT: size and flags; INFO_BLOCK_SIZE: 512 / 4096 / max.
        assert_eq!(be16(&r[8].2, 0), Some(INFO_EXPORT));
        assert_eq!(be64(&r[8].2, 2), Some(1 << 20));
        assert_eq!(be16(&r[8].2, 10), Some(geom().transmission_flags()));
        assert_eq!(be16(&r[9].2, 0), Some(INFO_BLOCK_SIZE));
        assert_eq!(be32(&r[9].2, 2), Some(512));
        assert_eq!(be32(&r[9].2, 6), Some(4096));
        assert_eq!(be32(&r[9].2, 10), Some(MAX_PAYLOAD));
        assert_eq!(&r[10].2[2..], b"disk");
        assert_eq!(&r[11].2[2..], b"fake disk");
    }

    #[test]
    fn export_name_abort_and_refusals() {
        let mut cat = FakeCatalog(vec![("d".into(), geom())]);
        // EXPORT_NAME with and without NO_ZEROES.
        for (flags, tail) in [(1u32, 124usize), (3, 0)] {
            let mut n = Negotiator::new();
            let mut input = flags.to_be_bytes().to_vec();
            input.extend(opt(OPT_EXPORT_NAME, b"d"));
            let mut out = Vec::new();
            let (evs, left) = run(&mut n, &mut cat, &input, &mut out);
            assert_eq!(left, 0);
            assert!(matches!(&evs[..], [HsEvent::Go { .. }]));
            assert_eq!(out.len(), 10 + tail);
            assert_eq!(be64(&out, 0), Some(1 << 20));
        }
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (0u32.to_be_bytes().to_vec(), "fixed newstyle"),
            (5u32.to_be_bytes().to_vec(), "unknown client flags"),
            (
                [&1u32.to_be_bytes()[..], &opt(OPT_EXPORT_NAME, b"zz")].concat(),
                "no such export",
            ),
            (
                [&1u32.to_be_bytes()[..], &[0u8; 16][..]].concat(),
                "bad option magic",
            ),
            (
                [
                    &1u32.to_be_bytes()[..],
                    &opt(OPT_LIST, &[])[..12],
                    &u32::MAX.to_be_bytes()[..],
                ]
                .concat(),
                "option too long",
            ),
        ];
        for (input, why) in cases {
            let mut n = Negotiator::new();
            let mut out = Vec::new();
            let (evs, _) = run(&mut n, &mut cat, &input, &mut out);
            assert!(
                matches!(&evs[..], [HsEvent::Close(w)] if w.contains(why)),
                "{why}: {evs:?}"
            );
        }
        let mut n = Negotiator::new();
        let mut out = Vec::new();
        let input = [&1u32.to_be_bytes()[..], &opt(OPT_ABORT, &[])].concat();
        let (evs, _) = run(&mut n, &mut cat, &input, &mut out);
        assert!(matches!(&evs[..], [HsEvent::Abort]));
        assert_eq!(replies(&out), [(OPT_ABORT, REP_ACK, vec![])]);
        // Too many options end the session.
        let mut n = Negotiator::new();
        let mut input = 1u32.to_be_bytes().to_vec();
        for _ in 0..=MAX_OPTIONS {
            input.extend(opt(OPT_LIST, &[]));
        }
        let mut out = Vec::new();
        let (evs, _) = run(&mut n, &mut cat, &input, &mut out);
        assert!(matches!(&evs[..], [HsEvent::Close("too many options")]));
    }

    #[test]
    fn partial_input_waits() {
        let mut cat = FakeCatalog(vec![("d".into(), geom())]);
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(opt(OPT_GO, &go_data("d", &[])));
        // Byte by byte: the same result as all at once.
        let mut n = Negotiator::new();
        let mut out = Vec::new();
        let mut buf = Vec::new();
        let mut went = false;
        for b in input {
            buf.push(b);
            loop {
                let (used, ev) = n.next(&buf, &mut cat, &mut out);
                buf.drain(..used);
                if matches!(ev, Some(HsEvent::Go { .. })) {
                    went = true;
                }
                if used == 0 {
                    break;
                }
            }
        }
        assert!(went && buf.is_empty());
    }
}
