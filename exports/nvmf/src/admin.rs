//! Admin and fabrics commands of a controller: properties, Identify,
//! features, log pages, keep-alive. Pure functions of the controller state
//! that write their data into the command's slot buffer; the connection
//! sends it. Asynchronous Event Requests are parked by the caller.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use wc_nvme_wire::command::{feature, FeatureCommand, GetLogPageCommand, IdentifyCommand};
use wc_nvme_wire::fabrics::{property, Capabilities, PropertyCommand};
use wc_nvme_wire::identify::{
    self, cns, cntrltype, encode_active_ns_list, encode_ns_id_descriptors, nidt, oncs,
    IdentifyController, IdentifyNamespace, NsIdDescriptor,
};
use wc_nvme_wire::log::{
    self, discovery, lid, DiscoveryLogEntry, DiscoveryLogHeader, SmartLog, DISCOVERY_ENTRY_LEN,
    DISCOVERY_HEADER_LEN, ERROR_ENTRY_LEN,
};
use wc_nvme_wire::opcode::admin;
use wc_nvme_wire::{Sqe, Status};

use crate::opts::{TransportOpts, ADMIN_IN_CAPSULE};
use crate::subsystem::{Controller, ERROR_LOG_ENTRIES};

/// What an admin command came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Completed: status, completion dword 0, bytes of data for the host
    /// (written at the start of the slot buffer).
    Done {
        status: Status,
        dw0: u32,
        /// Completion dword 1 (the high half of an 8-byte Property Get).
        dw1: u32,
        data_len: usize,
    },
    /// An Asynchronous Event Request: completes when an event comes.
    Park,
}

fn done(status: Status) -> Outcome {
    Outcome::Done {
        status,
        dw0: 0,
        dw1: 0,
        data_len: 0,
    }
}

fn ok_dw0(dw0: u32) -> Outcome {
    Outcome::Done {
        status: Status::SUCCESS,
        dw0,
        dw1: 0,
        data_len: 0,
    }
}

fn ok_data(len: usize) -> Outcome {
    Outcome::Done {
        status: Status::SUCCESS,
        dw0: 0,
        dw1: 0,
        data_len: len,
    }
}

/// Worst-case ready time reported in CAP.TO (500 ms units): 15 s.
const CAP_TO: u8 = 30;

pub(crate) fn capabilities(opts: &TransportOpts) -> u64 {
    Capabilities {
        mqes: opts.max_queue_depth,
        cqr: true,
        timeout_500ms: CAP_TO,
        css_nvm: true,
        mpsmin: 0,
        mpsmax: 0,
    }
    .to_u64()
}

/// Property Get / Property Set (admin queue only).
pub(crate) fn property(ctrlr: &Controller, opts: &TransportOpts, sqe: &Sqe, set: bool) -> Outcome {
    let p = PropertyCommand::parse(sqe);
    if set {
        if p.offset != property::CC || p.size8 {
            return done(Status::INVALID_FIELD.with_dnr());
        }
        let cc = p.value as u32;
        let mut s = ctrlr.state();
        let was = s.cc;
        s.cc = cc;
        if cc & property::cc::EN != 0 && was & property::cc::EN == 0 {
            s.csts |= property::csts::RDY;
            s.csts &= !(0x3 << property::csts::SHST_SHIFT);
        } else if cc & property::cc::EN == 0 && was & property::cc::EN != 0 {
            s.csts &= !property::csts::RDY;
        }
        let shn = (cc & property::cc::SHN_MASK) >> property::cc::SHN_SHIFT;
        if shn != property::cc::SHN_NONE {
            // Nothing is cached here: shutdown completes at once.
            s.csts =
                (s.csts & !(0x3 << property::csts::SHST_SHIFT)) | property::csts::SHST_COMPLETE;
        }
        return ok_dw0(0);
    }
    let s = ctrlr.state();
    let value: u64 = match p.offset {
        property::CAP => capabilities(opts),
        property::VS => property::VS_1_3 as u64,
        property::CC => s.cc as u64,
        property::CSTS => s.csts as u64,
        _ => return done(Status::INVALID_FIELD.with_dnr()),
    };
    // A 4-byte read of CAP gets its low half, as SPDK answers.
    Outcome::Done {
        status: Status::SUCCESS,
        dw0: value as u32,
        dw1: if p.size8 { (value >> 32) as u32 } else { 0 },
        data_len: 0,
    }
}

/// Runs admin command `sqe` for `ctrlr`; data for the host goes to `buf`.
pub(crate) fn execute(
    ctrlr: &Arc<Controller>,
    opts: &TransportOpts,
    sqe: &Sqe,
    buf: &mut [u8],
) -> Outcome {
    let discovery = ctrlr.subsys.discovery;
    ctrlr.touch_keep_alive();
    match sqe.opcode {
        admin::IDENTIFY => identify(ctrlr, opts, sqe, buf),
        admin::GET_LOG_PAGE => get_log_page(ctrlr, sqe, buf),
        admin::GET_FEATURES => get_features(ctrlr, sqe),
        admin::SET_FEATURES => set_features(ctrlr, sqe),
        admin::ASYNC_EVENT_REQUEST => Outcome::Park,
        admin::KEEP_ALIVE => ok_dw0(0),
        admin::ABORT if !discovery => ok_dw0(1), // nothing aborted
        _ => done(Status::INVALID_OPCODE.with_dnr()),
    }
}

fn identify(ctrlr: &Arc<Controller>, opts: &TransportOpts, sqe: &Sqe, buf: &mut [u8]) -> Outcome {
    let id = IdentifyCommand::parse(sqe);
    let len = identify::IDENTIFY_LEN;
    if buf.len() < len {
        return done(Status::INTERNAL_ERROR);
    }
    let out = &mut buf[..len];
    let subsys = &ctrlr.subsys;
    let r = match id.cns {
        cns::CONTROLLER => {
            let discovery = subsys.discovery;
            let fr = env!("CARGO_PKG_VERSION");
            let (model, serial) = if discovery {
                ("writecache discovery", "")
            } else {
                (subsys.model.as_str(), subsys.serial.as_str())
            };
            IdentifyController {
                vid: 0,
                ssvid: 0,
                serial,
                model,
                firmware: fr,
                mdts: opts.mdts(),
                cntlid: ctrlr.cntlid,
                ver: property::VS_1_3,
                oaes: if discovery { 1 << 31 } else { 1 << 8 },
                cntrltype: if discovery {
                    cntrltype::DISCOVERY
                } else {
                    cntrltype::IO
                },
                oacs: 0,
                acl: 3,
                aerl: (MAX_AERS - 1) as u8,
                lpa: 1 << 2,
                elpe: (ERROR_LOG_ENTRIES - 1) as u8,
                kas: 10,
                sqes: if discovery { 0 } else { 0x66 },
                cqes: if discovery { 0 } else { 0x44 },
                maxcmd: opts.max_queue_depth.min(65535) as u16,
                nn: if discovery { 0 } else { subsys.max_nsid() },
                oncs: if discovery {
                    0
                } else {
                    oncs::DSM | oncs::WRITE_ZEROES | oncs::COMPARE
                },
                vwc: if discovery { 0 } else { 1 },
                sgls: 1,
                mnan: if discovery { 0 } else { subsys.max_namespaces },
                subnqn: &subsys.nqn,
                ioccsz: (64 + opts.in_capsule_data_size) / 16,
                iorcsz: 1,
                icdoff: 0,
                fcatt: 0,
                msdbd: 1,
            }
            .encode(out)
        }
        _ if subsys.discovery => return done(Status::INVALID_FIELD.with_dnr()),
        cns::NAMESPACE => {
            if id.nsid == 0 || id.nsid > subsys.max_nsid() {
                return done(Status::INVALID_NAMESPACE.with_dnr());
            }
            match subsys.namespace(id.nsid) {
                // An inactive nsid within range reads as zeroes.
                None => {
                    out.fill(0);
                    Ok(())
                }
                Some(ns) => IdentifyNamespace {
                    nsze: ns.num_blocks,
                    ncap: ns.num_blocks,
                    nuse: ns.num_blocks,
                    nsfeat: 0,
                    nlbaf: 0,
                    flbas: 0,
                    dlfeat: 0,
                    nmic: 0,
                    nguid: ns.nguid,
                    eui64: ns.eui64.unwrap_or([0; 8]),
                    lbads: ns.block_size.trailing_zeros() as u8,
                }
                .encode(out),
            }
        }
        cns::ACTIVE_NS_LIST => {
            if id.nsid >= 0xffff_fffe {
                return done(Status::INVALID_NAMESPACE.with_dnr());
            }
            encode_active_ns_list(out, id.nsid, subsys.nsids()).map(|_| ())
        }
        cns::NS_ID_DESCRIPTOR_LIST => {
            let Some(ns) = subsys.namespace(id.nsid) else {
                return done(Status::INVALID_NAMESPACE.with_dnr());
            };
            let uuid = *ns.uuid.as_bytes();
            let eui = ns.eui64;
            let mut descs = vec![
                NsIdDescriptor {
                    nidt: nidt::NGUID,
                    nid: &ns.nguid,
                },
                NsIdDescriptor {
                    nidt: nidt::UUID,
                    nid: &uuid,
                },
            ];
            if let Some(e) = eui.as_ref() {
                descs.push(NsIdDescriptor {
                    nidt: nidt::EUI64,
                    nid: e,
                });
            }
            encode_ns_id_descriptors(out, &descs)
        }
        _ => return done(Status::INVALID_FIELD.with_dnr()),
    };
    match r {
        Ok(()) => ok_data(len),
        Err(_) => done(Status::INTERNAL_ERROR),
    }
}

/// Outstanding Asynchronous Event Requests a controller accepts.
pub(crate) const MAX_AERS: usize = 4;

fn get_features(ctrlr: &Controller, sqe: &Sqe) -> Outcome {
    let f = FeatureCommand::parse(sqe);
    let s = ctrlr.state();
    if f.sel == 3 {
        // Supported capabilities: changeable, not saveable.
        return ok_dw0(0x4);
    }
    let v = match f.fid {
        feature::NUMBER_OF_QUEUES if !ctrlr.subsys.discovery => {
            let n = s.num_io_queues.clamp(1, 65535) as u16;
            feature::num_queues_value(n, n)
        }
        feature::VOLATILE_WRITE_CACHE if !ctrlr.subsys.discovery => s.vwc_enabled as u32,
        feature::ASYNC_EVENT_CONFIG => s.aec,
        feature::KEEP_ALIVE_TIMER => ctrlr.kato_ms.load(Ordering::Relaxed),
        feature::ARBITRATION
        | feature::POWER_MANAGEMENT
        | feature::ERROR_RECOVERY
        | feature::INTERRUPT_COALESCING
        | feature::WRITE_ATOMICITY
            if !ctrlr.subsys.discovery =>
        {
            0
        }
        // 0x157 K (70 C): an over-temperature threshold nobody reaches.
        feature::TEMPERATURE_THRESHOLD if !ctrlr.subsys.discovery => 0x157,
        _ => return done(Status::INVALID_FIELD.with_dnr()),
    };
    ok_dw0(v)
}

fn set_features(ctrlr: &Controller, sqe: &Sqe) -> Outcome {
    let f = FeatureCommand::parse(sqe);
    if f.save {
        return done(Status::FEATURE_ID_NOT_SAVEABLE.with_dnr());
    }
    let mut s = ctrlr.state();
    match f.fid {
        feature::NUMBER_OF_QUEUES if !ctrlr.subsys.discovery => {
            if s.qpairs.iter().any(|q| q.qid != 0) {
                return done(Status::COMMAND_SEQUENCE_ERROR.with_dnr());
            }
            let (nsq, ncq) = feature::num_queues_parse(f.value);
            if nsq == 65536 || ncq == 65536 {
                return done(Status::INVALID_FIELD.with_dnr());
            }
            s.num_io_queues = nsq.min(ncq).min(ctrlr.max_io_qpairs);
            let n = s.num_io_queues as u16;
            ok_dw0(feature::num_queues_value(n, n))
        }
        feature::VOLATILE_WRITE_CACHE if !ctrlr.subsys.discovery => {
            s.vwc_enabled = f.value & 1 != 0;
            ok_dw0(0)
        }
        feature::ASYNC_EVENT_CONFIG => {
            s.aec = f.value;
            ok_dw0(0)
        }
        feature::KEEP_ALIVE_TIMER => {
            // Round up to the 1 s KAS granularity (KAS = 10 x 100 ms).
            let ms = f.value.div_ceil(1000).saturating_mul(1000);
            ctrlr.kato_ms.store(ms, Ordering::Relaxed);
            drop(s);
            ctrlr.touch_keep_alive();
            ok_dw0(0)
        }
        feature::ARBITRATION
        | feature::POWER_MANAGEMENT
        | feature::TEMPERATURE_THRESHOLD
        | feature::ERROR_RECOVERY
        | feature::INTERRUPT_COALESCING
        | feature::WRITE_ATOMICITY
            if !ctrlr.subsys.discovery =>
        {
            ok_dw0(0)
        }
        _ => done(Status::INVALID_FIELD.with_dnr()),
    }
}

fn get_log_page(ctrlr: &Arc<Controller>, sqe: &Sqe, buf: &mut [u8]) -> Outcome {
    let g = GetLogPageCommand::parse(sqe);
    if g.len > buf.len() as u64 {
        return done(Status::INVALID_FIELD.with_dnr());
    }
    let len = g.len as usize;
    if g.offset % 4 != 0 {
        return done(Status::INVALID_FIELD.with_dnr());
    }
    let discovery = ctrlr.subsys.discovery;
    let image: Vec<u8> = match g.lid {
        lid::DISCOVERY if discovery => discovery_log(ctrlr),
        lid::ERROR => {
            let s = ctrlr.state();
            let mut v = vec![0u8; ERROR_LOG_ENTRIES * ERROR_ENTRY_LEN];
            for (i, e) in s.error_log.iter().enumerate() {
                let _ = e.encode(&mut v[i * ERROR_ENTRY_LEN..]);
            }
            v
        }
        lid::SMART if !discovery => {
            let st = &ctrlr.stats;
            let units = |bytes: u64| bytes.div_ceil(512 * 1000);
            let s = ctrlr.state();
            let mut v = vec![0u8; log::SMART_LEN];
            let _ = SmartLog {
                temperature: 298,
                available_spare: 100,
                available_spare_threshold: 10,
                data_units_read: units(st.read_bytes.load(Ordering::Relaxed)),
                data_units_written: units(st.write_bytes.load(Ordering::Relaxed)),
                host_read_commands: st.read_cmds.load(Ordering::Relaxed),
                host_write_commands: st.write_cmds.load(Ordering::Relaxed),
                media_errors: st.media_errors.load(Ordering::Relaxed),
                num_error_log_entries: s.error_count,
                ..SmartLog::default()
            }
            .encode(&mut v);
            v
        }
        lid::CHANGED_NS_LIST if !discovery => {
            let mut s = ctrlr.state();
            let mut v = vec![0u8; log::CHANGED_NS_LIST_LEN];
            let _ = log::encode_changed_ns_list(&mut v, &s.changed_ns);
            if !g.rae {
                s.changed_ns.clear();
                s.ns_notice_masked = false;
            }
            v
        }
        _ => return done(Status::INVALID_LOG_PAGE.with_dnr()),
    };
    let _ = log::copy_log_window(&image, g.offset, &mut buf[..len]);
    ok_data(len)
}

/// The discovery log a host sees: every NVMe subsystem it may connect to,
/// once per listener, then the discovery subsystem's own listeners.
fn discovery_log(ctrlr: &Controller) -> Vec<u8> {
    let subs = crate::target::subsystems();
    let mut entries: Vec<(String, crate::subsystem::ListenAddress, u8)> = Vec::new();
    for s in &subs {
        if s.discovery || !s.host_allowed(&ctrlr.hostnqn) {
            continue;
        }
        for l in s.inner().listeners.iter() {
            entries.push((s.nqn.clone(), l.clone(), discovery::SUBTYPE_NVME));
        }
    }
    for s in subs.iter().filter(|s| s.discovery) {
        for l in s.inner().listeners.iter() {
            entries.push((
                s.nqn.clone(),
                l.clone(),
                discovery::SUBTYPE_CURRENT_DISCOVERY,
            ));
        }
    }
    let mut v = vec![0u8; DISCOVERY_HEADER_LEN + entries.len() * DISCOVERY_ENTRY_LEN];
    let _ = DiscoveryLogHeader {
        genctr: crate::target::generation(),
        numrec: entries.len() as u64,
        recfmt: 0,
    }
    .encode(&mut v);
    for (i, (nqn, l, subtype)) in entries.iter().enumerate() {
        let off = DISCOVERY_HEADER_LEN + i * DISCOVERY_ENTRY_LEN;
        let _ = DiscoveryLogEntry {
            trtype: discovery::TRTYPE_TCP,
            adrfam: if l.adrfam == "IPv6" {
                discovery::ADRFAM_IPV6
            } else {
                discovery::ADRFAM_IPV4
            },
            subtype: *subtype,
            treq: discovery::TREQ_SECURE_CHANNEL_NOT_REQUIRED,
            portid: 0,
            cntlid: discovery::CNTLID_DYNAMIC,
            asqsz: 32,
            trsvcid: &l.trsvcid,
            subnqn: nqn,
            traddr: &l.traddr,
            sectype: discovery::TCP_SECTYPE_NONE,
        }
        .encode(&mut v[off..]);
    }
    v
}

/// In-capsule data limit of a queue.
pub(crate) fn in_capsule_limit(opts: &TransportOpts, qid: u16) -> u32 {
    if qid == 0 {
        ADMIN_IN_CAPSULE.max(opts.in_capsule_data_size)
    } else {
        opts.in_capsule_data_size
    }
}
