//! The transmission phase's request parser, as a pure state machine.
//!
//! [`Decoder::next`] consumes request headers and WRITE payloads from the
//! bytes received so far and turns them into [`Event`]s. Every field is
//! checked against the export's [`Geometry`] before anything is allocated:
//! a WRITE buffer is only allocated once its length is known to be within
//! both the export and [`MAX_PAYLOAD`]. A WRITE that is refused has its
//! payload skipped (never buffered) so the stream stays in sync; a WRITE
//! longer than the maximum payload ends the connection instead.

use wc_bdev::DmaBuf;

use crate::proto::*;

/// A validated request, ready for the bdev.
#[derive(Debug)]
pub enum Command {
    /// Read `len` bytes at `offset`.
    Read {
        /// Byte offset (block aligned).
        offset: u64,
        /// Length in bytes (block multiple, <= max payload).
        len: u32,
    },
    /// Write `data` at `offset`.
    Write {
        /// Byte offset (block aligned).
        offset: u64,
        /// The payload (block multiple, <= max payload).
        data: DmaBuf,
        /// Durable before the reply.
        fua: bool,
    },
    /// Make completed writes durable.
    Flush,
    /// Discard a range.
    Trim {
        /// Byte offset (block aligned).
        offset: u64,
        /// Length in bytes (block multiple, non-zero).
        len: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// Zero a range.
    WriteZeroes {
        /// Byte offset (block aligned).
        offset: u64,
        /// Length in bytes (block multiple, non-zero).
        len: u32,
        /// Durable before the reply.
        fua: bool,
    },
}

/// What the connection must do next.
#[derive(Debug)]
pub enum Event {
    /// Submit `cmd` and reply to `handle` when done.
    Request {
        /// The client's handle, echoed in the reply.
        handle: u64,
        /// The command.
        cmd: Command,
    },
    /// Reply to `handle` with `error` (nothing to submit).
    Error {
        /// The client's handle.
        handle: u64,
        /// Protocol error value.
        error: u32,
    },
    /// `NBD_CMD_DISC`: finish what is in flight, then close.
    Disconnect,
    /// Protocol violation: close at once.
    Close(&'static str),
}

#[derive(Debug)]
enum State {
    Header,
    Payload {
        handle: u64,
        offset: u64,
        fua: bool,
        buf: DmaBuf,
        filled: usize,
    },
    Discard {
        handle: u64,
        error: u32,
        remaining: usize,
    },
    Done,
}

/// Parses requests for one export.
#[derive(Debug)]
pub struct Decoder {
    geom: Geometry,
    state: State,
}

impl Decoder {
    /// A decoder for an export of geometry `geom`.
    pub fn new(geom: Geometry) -> Decoder {
        Decoder {
            geom,
            state: State::Header,
        }
    }

    /// The geometry requests are checked against.
    pub fn geometry(&self) -> &Geometry {
        &self.geom
    }

    /// True between requests (not inside a WRITE payload): the place where
    /// a connection may stop reading for back-pressure.
    pub fn at_boundary(&self) -> bool {
        matches!(self.state, State::Header)
    }

    /// True after DISC or a fatal error: nothing more will be parsed.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Consumes bytes of at most one request from `input`; returns how many
    /// it used and the resulting event. `(0, None)` means "need more bytes".
    pub fn next(&mut self, input: &[u8]) -> (usize, Option<Event>) {
        match &mut self.state {
            State::Done => (0, None),
            State::Header => self.header(input),
            State::Payload {
                handle,
                offset,
                fua,
                buf,
                filled,
            } => {
                let n = (buf.len() - *filled).min(input.len());
                buf[*filled..*filled + n].copy_from_slice(&input[..n]);
                *filled += n;
                if *filled < buf.len() {
                    return (n, None);
                }
                let (handle, offset, fua) = (*handle, *offset, *fua);
                let State::Payload { buf, .. } = std::mem::replace(&mut self.state, State::Header)
                else {
                    return (n, None);
                };
                let cmd = Command::Write {
                    offset,
                    data: buf,
                    fua,
                };
                (n, Some(Event::Request { handle, cmd }))
            }
            State::Discard {
                handle,
                error,
                remaining,
            } => {
                let n = (*remaining).min(input.len());
                *remaining -= n;
                if *remaining > 0 {
                    return (n, None);
                }
                let ev = Event::Error {
                    handle: *handle,
                    error: *error,
                };
                self.state = State::Header;
                (n, Some(ev))
            }
        }
    }

    fn header(&mut self, input: &[u8]) -> (usize, Option<Event>) {
        let (Some(magic), Some(flags), Some(typ), Some(handle), Some(offset), Some(len)) = (
            be32(input, 0),
            be16(input, 4),
            be16(input, 6),
            be64(input, 8),
            be64(input, 16),
            be32(input, 24),
        ) else {
            return (0, None);
        };
        let used = REQUEST_LEN;
        if magic != REQUEST_MAGIC {
            self.state = State::Done;
            return (used, Some(Event::Close("bad request magic")));
        }
        let fua = flags & CMD_FLAG_FUA != 0;
        let err = |error| (used, Some(Event::Error { handle, error }));
        let g = self.geom;
        match typ {
            CMD_DISC => {
                self.state = State::Done;
                (used, Some(Event::Disconnect))
            }
            CMD_WRITE => {
                if len > g.max_payload {
                    self.state = State::Done;
                    return (used, Some(Event::Close("write payload too large")));
                }
                let check = if flags & !CMD_FLAG_FUA != 0 {
                    Err(errno::EINVAL)
                } else if g.readonly {
                    Err(errno::EPERM)
                } else {
                    self.range(offset, len, errno::ENOSPC)
                };
                if let Err(error) = check {
                    if len == 0 {
                        return err(error);
                    }
                    self.state = State::Discard {
                        handle,
                        error,
                        remaining: len as usize,
                    };
                    return (used, None);
                }
                match DmaBuf::try_new(len as usize) {
                    Some(buf) => {
                        self.state = State::Payload {
                            handle,
                            offset,
                            fua,
                            buf,
                            filled: 0,
                        };
                        (used, None)
                    }
                    None => {
                        self.state = State::Discard {
                            handle,
                            error: errno::ENOMEM,
                            remaining: len as usize,
                        };
                        (used, None)
                    }
                }
            }
            CMD_READ => {
                if flags & !CMD_FLAG_FUA != 0 || len > g.max_payload {
                    return err(errno::EINVAL);
                }
                match self.range(offset, len, errno::EINVAL) {
                    Ok(()) => (
                        used,
                        Some(Event::Request {
                            handle,
                            cmd: Command::Read { offset, len },
                        }),
                    ),
                    Err(e) => err(e),
                }
            }
            CMD_FLUSH => {
                if !g.flush || flags & !CMD_FLAG_FUA != 0 {
                    return err(errno::EINVAL);
                }
                (
                    used,
                    Some(Event::Request {
                        handle,
                        cmd: Command::Flush,
                    }),
                )
            }
            CMD_TRIM | CMD_WRITE_ZEROES => {
                let (supported, allowed) = if typ == CMD_TRIM {
                    (g.trim, CMD_FLAG_FUA)
                } else {
                    (g.write_zeroes, CMD_FLAG_FUA | CMD_FLAG_NO_HOLE)
                };
                if g.readonly {
                    return err(errno::EPERM);
                }
                if !supported || flags & !allowed != 0 {
                    return err(errno::EINVAL);
                }
                if let Err(e) = self.range(offset, len, errno::ENOSPC) {
                    return err(e);
                }
                let cmd = if typ == CMD_TRIM {
                    Command::Trim { offset, len, fua }
                } else {
                    Command::WriteZeroes { offset, len, fua }
                };
                (used, Some(Event::Request { handle, cmd }))
            }
            _ => err(errno::EINVAL),
        }
    }

    /// Checks length, alignment and bounds; `past_end` is the error for a
    /// range beyond the export (ENOSPC for writes, EINVAL for reads).
    fn range(&self, offset: u64, len: u32, past_end: u32) -> Result<(), u32> {
        let bs = u64::from(self.geom.block_size.max(1));
        if len == 0 || offset % bs != 0 || u64::from(len) % bs != 0 {
            return Err(errno::EINVAL);
        }
        match offset.checked_add(u64::from(len)) {
            Some(end) if end <= self.geom.size => Ok(()),
            _ => Err(past_end),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::negotiate::tests::geom;

    pub(crate) fn req(typ: u16, flags: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.put_u32(REQUEST_MAGIC);
        v.put_u16(flags);
        v.put_u16(typ);
        v.put_u64(handle);
        v.put_u64(offset);
        v.put_u32(len);
        v
    }

    fn all(d: &mut Decoder, input: &[u8]) -> Vec<Event> {
        let mut pos = 0;
        let mut evs = Vec::new();
        loop {
            let (used, ev) = d.next(&input[pos..]);
            pos += used;
            let stop = used == 0 && ev.is_none();
            if let Some(e) = ev {
                evs.push(e);
            }
            if stop {
                return evs;
            }
        }
    }

    fn errors(evs: &[Event]) -> Vec<(u64, u32)> {
        evs.iter()
            .map(|e| match e {
                Event::Error { handle, error } => (*handle, *error),
                Event::Request { handle, .. } => (*handle, 0),
                Event::Disconnect => (u64::MAX, 0),
                Event::Close(_) => (u64::MAX, u32::MAX),
            })
            .collect()
    }

    #[test]
    fn validates_every_command() {
        let mut d = Decoder::new(geom());
        let size = geom().size;
        let mut input = Vec::new();
        input.extend(req(CMD_READ, 0, 1, 0, 4096));
        input.extend(req(CMD_READ, 0, 2, 1, 512)); // unaligned
        input.extend(req(CMD_READ, 0, 3, size - 512, 1024)); // past the end
        input.extend(req(CMD_READ, 0, 4, 0, 0)); // empty
        input.extend(req(CMD_READ, 0, 5, 0, MAX_PAYLOAD + 512)); // too large
        input.extend(req(CMD_READ, 4, 6, 0, 512)); // DF not negotiated
        input.extend(req(CMD_WRITE, CMD_FLAG_FUA, 7, 512, 512));
        input.extend([0xab; 512]);
        input.extend(req(CMD_WRITE, 0, 8, size, 512)); // past the end: payload skipped
        input.extend([0xcd; 512]);
        input.extend(req(CMD_FLUSH, 0, 9, 0, 0));
        input.extend(req(CMD_TRIM, CMD_FLAG_FUA, 10, 0, 4096));
        input.extend(req(CMD_TRIM, 0, 11, u64::MAX - 511, 512)); // overflow
        input.extend(req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 12, 0, 512));
        input.extend(req(CMD_WRITE_ZEROES, 16, 13, 0, 512)); // FAST_ZERO not negotiated
        input.extend(req(5, 0, 14, 0, 512)); // CACHE: unknown here
        input.extend(req(CMD_DISC, 0, 15, 0, 0));
        input.extend(req(CMD_READ, 0, 16, 0, 512)); // after DISC: ignored
        let evs = all(&mut d, &input);
        use errno::*;
        assert_eq!(
            errors(&evs),
            [
                (1, 0),
                (2, EINVAL),
                (3, EINVAL),
                (4, EINVAL),
                (5, EINVAL),
                (6, EINVAL),
                (7, 0),
                (8, ENOSPC),
                (9, 0),
                (10, 0),
                (11, ENOSPC),
                (12, 0),
                (13, EINVAL),
                (14, EINVAL),
                (u64::MAX, 0),
            ]
        );
        match &evs[6] {
            Event::Request {
                cmd: Command::Write { offset, data, fua },
                ..
            } => {
                assert_eq!((*offset, data.len(), *fua), (512, 512, true));
                assert!(data.iter().all(|&b| b == 0xab));
            }
            e => panic!("{e:?}"),
        }
        assert!(d.is_done());
    }

    #[test]
    fn readonly_and_unsupported() {
        let g = Geometry {
            readonly: true,
            flush: false,
            trim: false,
            write_zeroes: false,
            ..geom()
        };
        let mut d = Decoder::new(g);
        let mut input = req(CMD_WRITE, 0, 1, 0, 512);
        input.extend([0u8; 512]);
        input.extend(req(CMD_TRIM, 0, 2, 0, 512));
        input.extend(req(CMD_WRITE_ZEROES, 0, 3, 0, 512));
        input.extend(req(CMD_FLUSH, 0, 4, 0, 0));
        input.extend(req(CMD_WRITE, 0, 5, 0, 0));
        input.extend(req(CMD_READ, CMD_FLAG_FUA, 6, 0, 512));
        let evs = all(&mut d, &input);
        use errno::*;
        assert_eq!(
            errors(&evs),
            [
                (1, EPERM),
                (2, EPERM),
                (3, EPERM),
                (4, EINVAL),
                (5, EPERM),
                (6, 0)
            ]
        );
        // A huge write ends the session; so does a bad magic.
        let mut d = Decoder::new(geom());
        let evs = all(&mut d, &req(CMD_WRITE, 0, 1, 0, MAX_PAYLOAD + 512));
        assert!(matches!(&evs[..], [Event::Close(_)]));
        let mut d = Decoder::new(geom());
        let mut bad = req(CMD_READ, 0, 1, 0, 512);
        bad[0] ^= 1;
        assert!(matches!(&all(&mut d, &bad)[..], [Event::Close(_)]));
    }

    #[test]
    fn payload_split_across_reads() {
        let mut input = req(CMD_WRITE, 0, 42, 0, 1024);
        input.extend((0..1024).map(|i| i as u8));
        input.extend(req(CMD_READ, 0, 43, 0, 512));
        for piece in [1, 7, 28, 100, 5000] {
            let mut d = Decoder::new(geom());
            let mut rx: Vec<u8> = Vec::new();
            let mut evs = Vec::new();
            for chunk in input.chunks(piece) {
                rx.extend_from_slice(chunk);
                loop {
                    let (used, ev) = d.next(&rx);
                    rx.drain(..used);
                    let stop = used == 0 && ev.is_none();
                    evs.extend(ev);
                    if stop {
                        break;
                    }
                }
            }
            assert!(rx.is_empty(), "piece {piece}");
            assert_eq!(errors(&evs), [(42, 0), (43, 0)], "piece {piece}");
            match &evs[0] {
                Event::Request {
                    cmd: Command::Write { data, .. },
                    ..
                } => assert!(data.iter().enumerate().all(|(i, &b)| b == i as u8)),
                e => panic!("{e:?}"),
            }
        }
    }
}
