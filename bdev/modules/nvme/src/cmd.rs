//! The commands this host sends, built with `wc-nvme-wire`'s builders,
//! and how their completion statuses map to bdev I/O statuses.

use wc_bdev::{IoStatus, IoType};
use wc_nvme_wire::command::{
    self, feature, DsmCommand, DsmRange, FeatureCommand, IdentifyCommand, RwCommand,
};
use wc_nvme_wire::fabrics::{ConnectCommand, ConnectData, PropertyCommand, CONNECT_DATA_LEN};
use wc_nvme_wire::opcode::io;
use wc_nvme_wire::{Sqe, Status};

/// CATTR bit 2: SQ flow control disabled.
const CATTR_SQFC_DISABLE: u8 = 1 << 2;

/// Fabrics Connect for queue `qid` with `depth` commands outstanding (an
/// SQ of `depth + 1` entries: one stays empty under SQ flow control).
pub(crate) fn connect(qid: u16, depth: u16, kato_ms: u32, sq_flow_control: bool) -> Sqe {
    let c = ConnectCommand {
        recfmt: 0,
        qid,
        sqsize: depth as u32 + 1,
        cattr: if sq_flow_control {
            0
        } else {
            CATTR_SQFC_DISABLE
        },
        kato: kato_ms,
    };
    // sqsize is 2..=65536 by construction (depth is a u16 below 65535).
    c.build(0).unwrap_or_default()
}

/// The 1 KiB data of Fabrics Connect.
pub(crate) fn connect_data(
    hostid: &[u8; 16],
    cntlid: u16,
    subnqn: &str,
    hostnqn: &str,
) -> [u8; CONNECT_DATA_LEN] {
    let mut b = [0u8; CONNECT_DATA_LEN];
    let d = ConnectData {
        hostid: *hostid,
        cntlid,
        subnqn,
        hostnqn,
    };
    // NQN lengths were validated with the attach parameters.
    if d.encode(&mut b).is_err() {
        tracing::error!("connect data: NQN too long");
    }
    b
}

/// Property Get of a 4- or 8-byte register.
pub(crate) fn property_get(offset: u32, size8: bool) -> Sqe {
    PropertyCommand {
        size8,
        offset,
        value: 0,
    }
    .build_get(0)
}

/// Property Set of a 4-byte register.
pub(crate) fn property_set(offset: u32, value: u32) -> Sqe {
    PropertyCommand {
        size8: false,
        offset,
        value: value as u64,
    }
    .build_set(0)
}

/// Identify with `cns` for `nsid`.
pub(crate) fn identify(cns: u8, nsid: u32) -> Sqe {
    IdentifyCommand {
        cns,
        cntid: 0,
        csi: 0,
        nsid,
    }
    .build(0)
}

/// Set Features, Number of Queues (`n` SQs and CQs, 1-based).
pub(crate) fn set_num_queues(n: u16) -> Sqe {
    FeatureCommand {
        fid: feature::NUMBER_OF_QUEUES,
        sel: 0,
        save: false,
        value: feature::num_queues_value(n, n),
    }
    .build_set(0)
}

/// Set Features, Asynchronous Event Configuration: namespace attribute
/// notices on (the only event this host acts on).
pub(crate) fn enable_ns_notices() -> Sqe {
    FeatureCommand {
        fid: feature::ASYNC_EVENT_CONFIG,
        sel: 0,
        save: false,
        value: feature::AEC_NS_ATTRIBUTE_NOTICES,
    }
    .build_set(0)
}

/// Asynchronous Event Request.
pub(crate) fn async_event_request() -> Sqe {
    command::async_event_request(0)
}

/// Get Log Page, Changed Namespace List (the whole 4 KiB page; reading it
/// clears the list and re-arms the notice on the target).
pub(crate) fn changed_ns_list() -> Sqe {
    command::GetLogPageCommand {
        lid: wc_nvme_wire::log::lid::CHANGED_NS_LIST,
        lsp: 0,
        rae: false,
        len: wc_nvme_wire::log::CHANGED_NS_LIST_LEN as u64,
        offset: 0,
        nsid: u32::MAX,
    }
    .build(0)
    // A 4 KiB page at offset 0 is always a valid request.
    .unwrap_or_default()
}

/// Keep Alive.
pub(crate) fn keep_alive() -> Sqe {
    command::keep_alive(0)
}

fn rw(opcode: u8, nsid: u32, slba: u64, nlb: u32, fua: bool) -> Sqe {
    RwCommand {
        slba,
        nlb,
        fua,
        deac: false,
    }
    .build(opcode, 0, nsid)
    // nlb is 1..=65536 by max_blocks_per_command.
    .unwrap_or_default()
}

/// Read `nlb` blocks.
pub(crate) fn read(nsid: u32, slba: u64, nlb: u32) -> Sqe {
    rw(io::READ, nsid, slba, nlb, false)
}

/// Write `nlb` blocks.
pub(crate) fn write(nsid: u32, slba: u64, nlb: u32, fua: bool) -> Sqe {
    rw(io::WRITE, nsid, slba, nlb, fua)
}

/// Write Zeroes of `nlb` blocks.
pub(crate) fn write_zeroes(nsid: u32, slba: u64, nlb: u32) -> Sqe {
    rw(io::WRITE_ZEROES, nsid, slba, nlb, false)
}

/// Flush of the namespace.
pub(crate) fn flush(nsid: u32) -> Sqe {
    command::flush(0, nsid)
}

/// Dataset Management, deallocate, one range.
pub(crate) fn dsm_deallocate(nsid: u32) -> Sqe {
    DsmCommand {
        nr: 1,
        deallocate: true,
        integral_read: false,
        integral_write: false,
    }
    .build(0, nsid)
    .unwrap_or_default()
}

/// The 16-byte range of a DSM.
pub(crate) fn dsm_range(slba: u64, nlb: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    let _ = DsmRange {
        context_attributes: 0,
        nlb,
        slba,
    }
    .encode(&mut b);
    b
}

/// Largest piece of an I/O of type `t` one command carries.
pub(crate) fn max_blocks_per_command(t: IoType, max_rw_blocks: u64) -> u64 {
    match t {
        IoType::Read | IoType::Write => max_rw_blocks.clamp(1, 65536),
        IoType::WriteZeroes => 65536,
        IoType::Unmap => u32::MAX as u64,
        IoType::Flush | IoType::Reset => u64::MAX,
    }
}

/// The bdev status of an NVMe completion status.
pub(crate) fn io_status(s: Status) -> IoStatus {
    if s == Status::SUCCESS {
        return IoStatus::Success;
    }
    let errno = if s == Status::LBA_OUT_OF_RANGE || s == Status::INVALID_FIELD {
        libc::EINVAL
    } else if s == Status::INVALID_OPCODE {
        libc::ENOTSUP
    } else if s == Status::INVALID_NAMESPACE {
        libc::ENODEV
    } else {
        libc::EIO
    };
    tracing::debug!("nvme command failed with status {:#06x}", s.0);
    IoStatus::Failed(errno)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wc_nvme_wire::command::RwCommand;
    use wc_nvme_wire::fabrics::ConnectCommand;

    #[test]
    fn connect_fields_round_trip() {
        let s = connect(3, 127, 0, false);
        let c = ConnectCommand::parse(&s);
        assert_eq!(
            (c.qid, c.sqsize, c.cattr, c.kato),
            (3, 128, CATTR_SQFC_DISABLE, 0)
        );
        let d = connect_data(&[7; 16], 0xffff, "nqn.sub", "nqn.host");
        let back = ConnectData::decode(&d).unwrap();
        assert_eq!(
            (back.subnqn, back.hostnqn, back.cntlid),
            ("nqn.sub", "nqn.host", 0xffff)
        );
    }

    #[test]
    fn write_carries_fua_and_range() {
        let s = write(1, 0x1_0000_0002, 8, true);
        let c = RwCommand::parse(&s);
        assert_eq!((c.slba, c.nlb, c.fua), (0x1_0000_0002, 8, true));
        assert_eq!(s.opcode, io::WRITE);
    }

    #[test]
    fn statuses_map_to_errnos() {
        assert_eq!(io_status(Status::SUCCESS), IoStatus::Success);
        assert_eq!(
            io_status(Status::LBA_OUT_OF_RANGE),
            IoStatus::Failed(libc::EINVAL)
        );
        assert_eq!(
            io_status(Status::INTERNAL_ERROR),
            IoStatus::Failed(libc::EIO)
        );
    }
}
