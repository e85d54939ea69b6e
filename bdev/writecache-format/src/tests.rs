use super::*;

const MIB: u64 = 1 << 20;

/// Tiny deterministic PRNG (xorshift64) so randomized round trips need no
/// extra dependency and failures reproduce.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Values biased towards the edges, where encoding bugs hide.
    fn edgy(&mut self) -> u64 {
        match self.next() % 4 {
            0 => 0,
            1 => u64::MAX,
            2 => self.next() % 1024,
            _ => self.next(),
        }
    }
}

fn raw_superblock(magic: u32, version: u32) -> [u8; SUPERBLOCK_SIZE] {
    let mut b = [0; SUPERBLOCK_SIZE];
    b[0..4].copy_from_slice(&magic.to_le_bytes());
    b[4..8].copy_from_slice(&version.to_le_bytes());
    b
}

fn sb(block_size: u32, n_blocks: u64) -> Superblock {
    Superblock {
        block_size,
        n_blocks,
        seq_count: 0,
    }
}

/// Reference for `Geometry::compute`: binary search for the largest fitting
/// n, independent of the kernel's count-down loop.
fn brute_force_n_blocks(available: u64, block_size: u32) -> u64 {
    let fits = |n: u64| layout_size(n, block_size).is_some_and(|(_, total)| total <= available);
    let (mut lo, mut hi) = (0u64, available / u64::from(block_size) + 1);
    while lo + 1 < hi {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

// ---- superblock ----

#[test]
fn superblock_byte_layout() {
    let s = Superblock {
        block_size: 4096,
        n_blocks: 0x0102_0304_0506_0708,
        seq_count: 0x1112_1314_1516_1718,
    };
    let b = s.encode();
    assert_eq!(b[0..4], [0x21, 0x93, 0x48, 0x23]); // magic, little-endian
    assert_eq!(b[4..8], [1, 0, 0, 0]);
    assert_eq!(b[8..12], 4096u32.to_le_bytes());
    assert_eq!(b[12..16], [0; 4]); // pad
    assert_eq!(b[16..24], [8, 7, 6, 5, 4, 3, 2, 1]);
    assert_eq!(b[24..32], [0x18, 0x17, 0x16, 0x15, 0x14, 0x13, 0x12, 0x11]);
    assert!(b[32..].iter().all(|&x| x == 0));
}

/// Whole encodings against literal bytes: the 16 MiB / 4 KiB cache Linux
/// reports (4080 blocks) at seq_count 3, its magic-less first format step,
/// and entries (sector 8 of 4 KiB block 1, seq 2; unused; a kernel-freed
/// entry that keeps its sector).
#[test]
fn golden_bytes() {
    #[rustfmt::skip]
    const SB: [u8; SUPERBLOCK_SIZE] = [
        0x21, 0x93, 0x48, 0x23, // magic 0x23489321
        0x01, 0x00, 0x00, 0x00, // version 1
        0x00, 0x10, 0x00, 0x00, // block_size 4096
        0x00, 0x00, 0x00, 0x00, // pad
        0xf0, 0x0f, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // n_blocks 4080
        0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // seq_count 3
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let s = Superblock {
        block_size: 4096,
        n_blocks: 4080,
        seq_count: 3,
    };
    assert_eq!(s.encode(), SB);
    let mut no_magic = SB;
    no_magic[..4].fill(0);
    assert_eq!(s.encode_without_magic(), no_magic);
    assert_eq!(Superblock::decode(&SB), Ok(SuperblockState::Formatted(s)));

    #[rustfmt::skip]
    const E: [u8; ENTRY_SIZE] = [
        0x08, 0, 0, 0, 0, 0, 0, 0, // original_sector 8
        0x02, 0, 0, 0, 0, 0, 0, 0, // seq_count 2
    ];
    let e = Entry {
        original_sector: 8,
        seq_count: 2,
    };
    assert_eq!(e.encode(), E);
    assert_eq!(Entry::decode(&E), e);
    assert_eq!(Entry::UNUSED.encode(), [0xff; ENTRY_SIZE]);
    #[rustfmt::skip]
    const FREED: [u8; ENTRY_SIZE] = [
        0x08, 0, 0, 0, 0, 0, 0, 0,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    ];
    let freed = Entry::decode(&FREED);
    assert!(freed.is_unused() && freed.original_sector == 8);

    // Entries in a metadata buffer: entry i at 64 + 16 i.
    let mut meta = [0u8; SUPERBLOCK_SIZE + 3 * ENTRY_SIZE];
    meta[..SUPERBLOCK_SIZE].copy_from_slice(&SB);
    e.write_at(&mut meta, 2).unwrap();
    Entry::UNUSED.write_at(&mut meta, 0).unwrap();
    assert_eq!(meta[64..80], [0xff; 16]);
    assert_eq!(meta[80..96], [0; 16]);
    assert_eq!(meta[96..112], E);
}

#[test]
fn superblock_roundtrip_random() {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    for _ in 0..10_000 {
        let s = Superblock {
            block_size: rng.edgy() as u32,
            n_blocks: rng.edgy(),
            seq_count: rng.edgy(),
        };
        assert_eq!(
            Superblock::decode(&s.encode()),
            Ok(SuperblockState::Formatted(s))
        );
    }
}

#[test]
fn superblock_decode_ignores_pad_and_tail() {
    let s = sb(512, 7);
    let mut b = s.encode();
    b[12..16].fill(0xaa);
    b[32..].fill(0x55);
    assert_eq!(Superblock::decode(&b), Ok(SuperblockState::Formatted(s)));
}

#[test]
fn blank_iff_magic_and_version_zero() {
    assert_eq!(
        Superblock::decode(&[0; SUPERBLOCK_SIZE]),
        Ok(SuperblockState::Blank)
    );
    // dm-writecache looks only at magic and version; leftover bytes elsewhere
    // still mean "format me".
    let mut garbage = [0xff; SUPERBLOCK_SIZE];
    garbage[0..8].fill(0);
    assert_eq!(Superblock::decode(&garbage), Ok(SuperblockState::Blank));
}

#[test]
fn decode_rejects_bad_magic() {
    let e = Superblock::decode(&raw_superblock(0xdead_beef, VERSION)).unwrap_err();
    assert_eq!(e, FormatError::BadMagic { found: 0xdead_beef });
    assert_eq!(e.errno(), 22);
    assert!(e.to_string().contains("0xdeadbeef"), "{e}");
    // Magic zero with a non-zero version is not blank.
    assert_eq!(
        Superblock::decode(&raw_superblock(0, VERSION)),
        Err(FormatError::BadMagic { found: 0 })
    );
}

#[test]
fn interrupted_format_is_refused_not_blank() {
    let b = sb(4096, 10).encode_without_magic();
    assert_eq!(
        Superblock::decode(&b),
        Err(FormatError::BadMagic { found: 0 })
    );
}

#[test]
fn decode_rejects_bad_version() {
    for version in [0, 2, u32::MAX] {
        assert_eq!(
            Superblock::decode(&raw_superblock(MAGIC, version)),
            Err(FormatError::BadVersion { found: version })
        );
    }
}

// ---- entries ----

#[test]
fn entry_byte_layout_and_roundtrip() {
    let e = Entry {
        original_sector: 0x0102_0304_0506_0708,
        seq_count: 42,
    };
    let b = e.encode();
    assert_eq!(b[..8], [8, 7, 6, 5, 4, 3, 2, 1]);
    assert_eq!(b[8..], 42u64.to_le_bytes());
    assert_eq!(Entry::decode(&b), e);

    let mut rng = XorShift(12345);
    for _ in 0..10_000 {
        let e = Entry {
            original_sector: rng.edgy(),
            seq_count: rng.edgy(),
        };
        assert_eq!(Entry::decode(&e.encode()), e);
    }
}

#[test]
fn unused_entry_is_all_ones() {
    assert_eq!(Entry::UNUSED.encode(), [0xff; ENTRY_SIZE]);
    assert_eq!(Entry::decode(&[0xff; ENTRY_SIZE]), Entry::UNUSED);
    assert!(Entry::UNUSED.is_unused());
    // A freed entry keeps its sector; only seq_count marks it free.
    let freed = Entry {
        original_sector: 8,
        seq_count: u64::MAX,
    };
    assert!(freed.is_unused());
    assert!(!Entry {
        original_sector: u64::MAX,
        seq_count: 0
    }
    .is_unused());
}

#[test]
fn entry_at_index_in_metadata_buffer() {
    let g = Geometry::compute(MIB, 0, 4096).unwrap();
    let mut meta = vec![0u8; g.metadata_bytes() as usize];
    let last = g.n_blocks() - 1;
    let e = Entry {
        original_sector: 99,
        seq_count: 3,
    };
    e.write_at(&mut meta, 0).unwrap();
    Entry::UNUSED.write_at(&mut meta, last).unwrap();
    assert_eq!(meta[64..80], e.encode());
    assert_eq!(Entry::read_at(&meta, 0), Ok(e));
    assert_eq!(Entry::read_at(&meta, last), Ok(Entry::UNUSED));
    // The buffer offset agrees with the absolute offset from the geometry.
    let off = (g.entry_offset(last) - g.superblock_offset()) as usize;
    assert_eq!(meta[off..off + ENTRY_SIZE], [0xff; ENTRY_SIZE]);
}

#[test]
fn entry_at_index_out_of_bounds() {
    let mut meta = [0u8; SUPERBLOCK_SIZE + 2 * ENTRY_SIZE + 3];
    assert!(Entry::read_at(&meta, 1).is_ok());
    for index in [2, u64::MAX / 16, u64::MAX] {
        let err = FormatError::EntryOutOfBounds {
            index,
            buf_len: meta.len(),
        };
        assert_eq!(Entry::read_at(&meta, index), Err(err));
        assert_eq!(Entry::UNUSED.write_at(&mut meta, index), Err(err));
    }
    // Shorter than the superblock itself.
    assert!(Entry::read_at(&meta[..10], 0).is_err());
}

#[test]
fn committed_boundary() {
    let at = |seq_count| Entry {
        original_sector: 0,
        seq_count,
    };
    assert!(committed(&at(4), 5));
    assert!(!committed(&at(5), 5)); // written in the open epoch
    assert!(!committed(&at(6), 5));
    assert!(!committed(&at(0), 0)); // fresh format: nothing committed
    assert!(!committed(&Entry::UNUSED, u64::MAX));
    assert!(at(u64::MAX - 1).is_committed(u64::MAX));
}

// ---- geometry ----

#[test]
fn geometry_linux_reference_16mib_4k() {
    let g = Geometry::compute(16 * MIB, 0, 4096).unwrap();
    assert_eq!(g.n_blocks(), 4080);
    // 64 + 16 * 4080 = 65344 -> 16 metadata blocks; 16 + 4080 = 4096 blocks.
    assert_eq!(g.metadata_bytes(), 65536);
    assert_eq!(g.n_metadata_blocks(), 16);
    assert_eq!(g.superblock_offset(), 0);
    assert_eq!(g.data_start(), 65536);
    assert_eq!(g.entry_offset(0), 64);
    assert_eq!(g.entry_offset(4079), 64 + 16 * 4079);
    assert_eq!(g.block_offset(0), 65536);
    assert_eq!(g.block_offset(4079), 16 * MIB - 4096);
    assert_eq!(g.end(), 16 * MIB);
    assert_eq!(g.initial_superblock(), sb(4096, 4080));
}

#[test]
fn geometry_512_byte_blocks_with_start_sector() {
    let g = Geometry::compute(MIB, 8, 512).unwrap();
    assert_eq!(g.superblock_offset(), 4096);
    assert_eq!(g.n_blocks(), 1978);
    // 64 + 16 * 1978 = 31712 -> 31744 (62 blocks).
    assert_eq!(g.metadata_bytes(), 31744);
    assert_eq!(g.n_metadata_blocks(), 62);
    assert_eq!(g.data_start(), 4096 + 31744);
    assert_eq!(g.entry_offset(0), 4096 + 64);
    assert_eq!(g.block_offset(1), 4096 + 31744 + 512);
    assert_eq!(g.end(), MIB);
}

#[test]
fn geometry_counts_down_from_the_upper_bound() {
    // usable = 151547: the first guess, 287 blocks, does not fit once the
    // metadata is rounded up; 285 does.
    let g = Geometry::compute(151_547 + 1024, 2, 512).unwrap();
    assert_eq!(g.n_blocks(), 285);
    assert_eq!(g.metadata_bytes(), 5120);
    assert_eq!(g.data_start(), 1024 + 5120);
    assert_eq!(g.end(), 1024 + 151_040);
}

#[test]
fn geometry_is_maximal_random() {
    let mut rng = XorShift(0xC0FF_EE00_D15E_A5E5);
    for i in 0..5_000 {
        let block_size = MIN_BLOCK_SIZE << (rng.next() % 4);
        // Mostly small devices, some huge ones to exercise large values.
        let device = if i % 10 == 0 {
            rng.next() >> (rng.next() % 8)
        } else {
            rng.next() % (64 * MIB)
        };
        let start_sector = rng.next() % 64;
        let Ok(g) = Geometry::compute(device, start_sector, block_size) else {
            continue;
        };
        let available = device - start_sector * SECTOR_SIZE;
        assert_eq!(g.n_blocks(), brute_force_n_blocks(available, block_size));
        assert!(g.end() <= device);
        assert_eq!(
            g.data_start() % u64::from(block_size),
            (start_sector * 512) % u64::from(block_size)
        );
        assert_eq!(
            g.block_offset(g.n_blocks() - 1) + u64::from(block_size),
            g.end()
        );
        // Attaching what we would format must give back the same layout.
        let s = g.initial_superblock();
        assert_eq!(validate(&s, device, start_sector, Some(block_size)), Ok(g));
    }
}

#[test]
#[should_panic(expected = "out of range")]
fn block_offset_past_end_panics() {
    let g = Geometry::compute(16 * MIB, 0, 4096).unwrap();
    g.block_offset(4080);
}

#[test]
fn compute_rejects_bad_block_size() {
    for block_size in [0, 3, 256, 1000, 8192, u32::MAX] {
        let e = Geometry::compute(16 * MIB, 0, block_size).unwrap_err();
        assert_eq!(e, FormatError::BlockSizeInvalid { block_size });
        assert_eq!(e.errno(), 22);
    }
}

#[test]
fn compute_rejects_start_past_end() {
    assert_eq!(
        Geometry::compute(MIB, MIB / 512 + 1, 512),
        Err(FormatError::StartSectorPastEnd {
            start_sector: MIB / 512 + 1,
            device_size: MIB,
        })
    );
    // start_sector * 512 overflows u64: still an error, not a panic.
    assert_eq!(
        Geometry::compute(u64::MAX, u64::MAX, 512),
        Err(FormatError::StartSectorPastEnd {
            start_sector: u64::MAX,
            device_size: u64::MAX,
        })
    );
}

#[test]
fn compute_rejects_too_small_device() {
    // Smallest usable device: one metadata block + one data block.
    let g = Geometry::compute(8192, 0, 4096).unwrap();
    assert_eq!(g.n_blocks(), 1);
    let e = Geometry::compute(8191, 0, 4096).unwrap_err();
    assert_eq!(
        e,
        FormatError::DeviceTooSmall {
            needed: 8192,
            available: 8191
        }
    );
    assert_eq!(e.errno(), 28);
    assert!(e.to_string().contains("8192"), "{e}");
    for (device, start) in [(0, 0), (MIB, MIB / 512), (1024, 1)] {
        assert_eq!(
            Geometry::compute(device, start, 512),
            Err(FormatError::DeviceTooSmall {
                needed: 1024,
                available: device - start * 512,
            })
        );
    }
}

#[test]
fn compute_huge_device_does_not_overflow() {
    let g = Geometry::compute(1 << 58, 0, 4096).unwrap();
    assert_eq!(g.n_blocks(), brute_force_n_blocks(1 << 58, 4096));
    assert!(g.end() <= 1 << 58);
    // A 2^64-byte device would need more than 2^47 entries, which the
    // kernel's 47-bit entry index cannot address.
    for block_size in [512, 4096] {
        let e = Geometry::compute(u64::MAX, 0, block_size).unwrap_err();
        assert!(matches!(
            e,
            FormatError::TooManyBlocks {
                max: MAX_BLOCKS,
                ..
            }
        ));
        assert_eq!(e.errno(), 27);
    }
}

// ---- validate ----

#[test]
fn validate_accepts_smaller_cache_on_larger_device() {
    // A device that grew after formatting keeps the recorded n_blocks.
    let g = validate(&sb(4096, 100), 16 * MIB, 0, None).unwrap();
    assert_eq!(g.n_blocks(), 100);
    assert_eq!(g.metadata_bytes(), 4096);
    assert_eq!(g.end(), 101 * 4096);
}

#[test]
fn validate_rejects_bad_block_size() {
    for block_size in [0, 3, 8192] {
        assert_eq!(
            validate(&sb(block_size, 10), 16 * MIB, 0, None),
            Err(FormatError::BlockSizeInvalid { block_size })
        );
    }
    assert_eq!(
        validate(&sb(4096, 10), 16 * MIB, 0, Some(3)),
        Err(FormatError::BlockSizeInvalid { block_size: 3 })
    );
}

#[test]
fn validate_rejects_block_size_mismatch() {
    let e = validate(&sb(4096, 10), 16 * MIB, 0, Some(512)).unwrap_err();
    assert_eq!(
        e,
        FormatError::BlockSizeMismatch {
            found: 4096,
            expected: 512
        }
    );
    assert!(e.to_string().contains("4096") && e.to_string().contains("512"));
}

#[test]
fn validate_rejects_zero_blocks() {
    assert_eq!(
        validate(&sb(4096, 0), 16 * MIB, 0, None),
        Err(FormatError::ZeroBlocks)
    );
}

#[test]
fn validate_rejects_n_blocks_too_large_for_device() {
    assert!(validate(&sb(4096, 4080), 16 * MIB, 0, Some(4096)).is_ok());
    // One more block needs another metadata block and another data block.
    let e = validate(&sb(4096, 4081), 16 * MIB, 0, Some(4096)).unwrap_err();
    assert_eq!(
        e,
        FormatError::BlocksExceedDevice {
            n_blocks: 4081,
            needed: 16 * MIB + 4096,
            available: 16 * MIB,
        }
    );
    assert_eq!(e.errno(), 22);
    // Same cache, but the superblock is now shifted by one sector.
    assert!(matches!(
        validate(&sb(4096, 4080), 16 * MIB, 1, None),
        Err(FormatError::BlocksExceedDevice { .. })
    ));
}

#[test]
fn validate_hostile_values_do_not_panic() {
    let hostile = Superblock {
        block_size: 4096,
        n_blocks: u64::MAX,
        seq_count: u64::MAX,
    };
    assert_eq!(
        validate(&hostile, u64::MAX, 0, None),
        Err(FormatError::TooManyBlocks {
            n_blocks: u64::MAX,
            max: MAX_BLOCKS
        })
    );
    // Values whose byte size would overflow u64 with naive arithmetic.
    for n_blocks in [u64::MAX / 16, u64::MAX / 4096 + 1, MAX_BLOCKS + 1] {
        assert!(validate(&sb(4096, n_blocks), u64::MAX, 0, None).is_err());
    }
    // The largest accepted count fits a 2^64-byte device without overflow.
    let g = validate(&sb(4096, MAX_BLOCKS), u64::MAX, 0, None).unwrap();
    assert!(g.end() > g.data_start());
    assert_eq!(
        validate(&sb(4096, 1), u64::MAX, u64::MAX, None),
        Err(FormatError::StartSectorPastEnd {
            start_sector: u64::MAX,
            device_size: u64::MAX,
        })
    );
}

#[test]
fn errno_mapping() {
    use FormatError::*;
    let cases = [
        (BadMagic { found: 1 }, 22),
        (BadVersion { found: 2 }, 22),
        (BlockSizeInvalid { block_size: 3 }, 22),
        (
            BlockSizeMismatch {
                found: 512,
                expected: 4096,
            },
            22,
        ),
        (ZeroBlocks, 22),
        (
            StartSectorPastEnd {
                start_sector: 9,
                device_size: 0,
            },
            22,
        ),
        (
            BlocksExceedDevice {
                n_blocks: 1,
                needed: 2,
                available: 1,
            },
            22,
        ),
        (
            EntryOutOfBounds {
                index: 0,
                buf_len: 0,
            },
            22,
        ),
        (
            DeviceTooSmall {
                needed: 2,
                available: 1,
            },
            28,
        ),
        (
            TooManyBlocks {
                n_blocks: 1,
                max: 0,
            },
            27,
        ),
    ];
    for (err, errno) in cases {
        assert_eq!(err.errno(), errno, "{err}");
    }
}
