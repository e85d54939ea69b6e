/*
 * writecache_bdev: fio ioengine that runs the writecache bdev stack inside
 * fio, as SPDK's spdk_bdev plugin (examples/bdev/fio_plugin) does.
 *
 * This file is the thin C half: it is compiled against the headers of the
 * fio that loads it (scripts/build_fio_engine.sh fetches and configures
 * Debian's fio source), so fio's thread_data, io_u and fio_file layouts
 * are never re-declared elsewhere. Everything else lives in the Rust crate
 * wc-fio-engine (fio/src), linked in as a static library:
 *
 *   setup    start the framework once (config replay, RPC server), check
 *            each filename is a bdev, report its size, check bs alignment
 *   init     attach this fio thread to its own reactor
 *   open     open the bdev and get this reactor's channel
 *   queue    submit to the bdev (never waits); no commit, as SPDK's plugin:
 *            fio would call it before every getevents too (an empty poll)
 *   getevents/event  poll the reactor, hand back every completed io_u
 *   cleanup  wait for in-flight I/O, close, detach the reactor
 *
 * Loading: LD_PRELOAD=libwritecache_fio.so fio ... ioengine=writecache_bdev
 * (registered by the constructor below), or ioengine=external:<path>
 * (fio looks up the exported `ioengine` struct). The framework stops when
 * the process exits (destructor), committing a writecache as
 * writecache_tgt does on SIGTERM.
 */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "fio.h"
#include "optgroup.h"

/* The Rust half (fio/src/lib.rs). */
int wc_fio_env_start(const char *json_conf, const char *rpc_addr, uint32_t jobs,
		     char *err, size_t errlen);
void wc_fio_env_stop(void);
int wc_fio_bdev_geometry(const char *bdev, uint32_t *block_size, uint64_t *num_blocks,
			 char *err, size_t errlen);
void *wc_fio_job_new(uint32_t index, uint32_t iodepth, int interrupt_mode, char *err,
		     size_t errlen);
int wc_fio_job_open(void *job, const char *bdev, char *err, size_t errlen);
void wc_fio_job_close(void *job, int target);
int wc_fio_job_queue(void *job, int target, int op, void *buf, uint64_t len, uint64_t offset,
		     void *tag);
int wc_fio_job_getevents(void *job, uint32_t min, int64_t timeout_ns);
void *wc_fio_job_event(void *job, int i, int *err);
void wc_fio_job_free(void *job);

/*
 * Weak: LD_PRELOAD reaches every program a shell starts, not only fio.
 * Elsewhere these are NULL, and the library registers nothing.
 */
#pragma weak thread_number
#pragma weak register_ioengine
#pragma weak unregister_ioengine

#define ENGINE "writecache_bdev"
#define ERRLEN 512

struct wc_fio_options {
	void *pad; /* fio requires the first member to be a pointer */
	char *json_conf;
	char *rpc_listen_addr;
	unsigned int interrupt_mode;
};

static struct fio_option options[] = {
	{
		.name = "spdk_json_conf",
		.lname = "bdev configuration (JSON or YAML)",
		.type = FIO_OPT_STR_STORE,
		.off1 = offsetof(struct wc_fio_options, json_conf),
		.help = "writecache_tgt config replayed at start (as writecache_tgt --json)",
		.category = FIO_OPT_C_ENGINE,
		.group = FIO_OPT_G_INVALID,
	},
	{
		.name = "spdk_rpc_listen_addr",
		.lname = "JSON-RPC socket",
		.type = FIO_OPT_STR_STORE,
		.off1 = offsetof(struct wc_fio_options, rpc_listen_addr),
		.help = "serve JSON-RPC on this Unix socket during the run (spdk-rpc -s PATH ...)",
		.category = FIO_OPT_C_ENGINE,
		.group = FIO_OPT_G_INVALID,
	},
	{
		.name = "interrupt_mode",
		.lname = "sleep when idle",
		.type = FIO_OPT_BOOL,
		.off1 = offsetof(struct wc_fio_options, interrupt_mode),
		.def = "0",
		.help = "1: a job's reactor sleeps while waiting for completions (shared machines); "
			"0: busy polling, as bdevperf",
		.category = FIO_OPT_C_ENGINE,
		.group = FIO_OPT_G_INVALID,
	},
	{
		.name = NULL,
	},
};

static int wc_require_thread(struct thread_data *td)
{
	if (!td->o.use_thread) {
		log_err(ENGINE ": must set thread=1 when using spdk plugin\n");
		return 1;
	}
	return 0;
}

static int wc_env_start(struct thread_data *td)
{
	struct wc_fio_options *o = td->eo;
	char err[ERRLEN];

	if (wc_fio_env_start(o->json_conf, o->rpc_listen_addr, thread_number, err, sizeof(err))) {
		log_err(ENGINE ": %s\n", err);
		return 1;
	}
	return 0;
}

/* Every transfer size and alignment must be whole blocks of the bdev. */
static int wc_check_block_size(struct thread_data *td, struct fio_file *f, uint32_t bs)
{
	static const char *const names[DDIR_RWDIR_CNT] = { "read", "write", "trim" };
	int d;

	for (d = 0; d < DDIR_RWDIR_CNT; d++) {
		unsigned long long v[3] = { td->o.min_bs[d], td->o.max_bs[d], td->o.ba[d] };
		int k;

		for (k = 0; k < 3; k++) {
			if (v[k] % bs) {
				log_err(ENGINE ": %s %s %llu is not a multiple of bdev %s's block size "
					"%u\n", names[d], k == 2 ? "ba" : "bs", v[k], f->file_name, bs);
				return 1;
			}
		}
	}
	return 0;
}

static int wc_setup(struct thread_data *td)
{
	struct fio_file *f;
	unsigned int i;
	char err[ERRLEN];

	if (wc_require_thread(td) || wc_env_start(td))
		return 1;
	for_each_file(td, f, i) {
		uint32_t bs;
		uint64_t nb;

		if (wc_fio_bdev_geometry(f->file_name, &bs, &nb, err, sizeof(err))) {
			log_err(ENGINE ": %s\n", err);
			return 1;
		}
		if (wc_check_block_size(td, f, bs))
			return 1;
		f->real_file_size = (uint64_t)bs * nb;
		f->filetype = FIO_TYPE_BLOCK;
		fio_file_set_size_known(f);
	}
	return 0;
}

static int wc_init(struct thread_data *td)
{
	struct wc_fio_options *o = td->eo;
	char err[ERRLEN];
	void *job;

	/* With create_serialize=0, init runs before setup. */
	if (wc_require_thread(td) || wc_env_start(td))
		return 1;
	job = wc_fio_job_new(td->thread_number - 1, td->o.iodepth, o->interrupt_mode != 0, err,
			     sizeof(err));
	if (!job) {
		log_err(ENGINE ": %s\n", err);
		return 1;
	}
	td->io_ops_data = job;
	return 0;
}

static int wc_open(struct thread_data *td, struct fio_file *f)
{
	char err[ERRLEN];
	int t;

	if (!td->io_ops_data) {
		log_err(ENGINE ": %s opened outside a job thread\n", f->file_name);
		return 1;
	}
	t = wc_fio_job_open(td->io_ops_data, f->file_name, err, sizeof(err));
	if (t < 0) {
		log_err(ENGINE ": %s\n", err);
		td_verror(td, ENODEV, "open_file");
		return 1;
	}
	FILE_SET_ENG_DATA(f, (void *)(uintptr_t)(t + 1));
	return 0;
}

static int wc_close(struct thread_data *td, struct fio_file *f)
{
	uintptr_t t = (uintptr_t)FILE_ENG_DATA(f);

	if (td->io_ops_data && t)
		wc_fio_job_close(td->io_ops_data, (int)(t - 1));
	FILE_SET_ENG_DATA(f, NULL);
	return 0;
}

static int wc_invalidate(struct thread_data *td, struct fio_file *f)
{
	/* No page cache in between. */
	return 0;
}

static enum fio_q_status wc_queue(struct thread_data *td, struct io_u *io_u)
{
	uintptr_t t = (uintptr_t)FILE_ENG_DATA(io_u->file);
	int op, rc;

	switch (io_u->ddir) {
	case DDIR_READ:
		op = 0;
		break;
	case DDIR_WRITE:
		op = 1;
		break;
	case DDIR_TRIM:
		op = 2;
		break;
	case DDIR_SYNC:
	case DDIR_DATASYNC:
		op = 3;
		break;
	default:
		io_u->error = EINVAL;
		return FIO_Q_COMPLETED;
	}
	if (!t) {
		io_u->error = EBADF;
		return FIO_Q_COMPLETED;
	}
	rc = wc_fio_job_queue(td->io_ops_data, (int)(t - 1), op, io_u->xfer_buf,
			      io_u->xfer_buflen, io_u->offset, io_u);
	if (rc) {
		io_u->error = rc;
		return FIO_Q_COMPLETED;
	}
	return FIO_Q_QUEUED;
}

/*
 * Returns every completion ready, even past `max`, as SPDK's plugin does:
 * fio's iodepth_batch_complete_max defaults to its min (1), and one
 * completion per call would make fio pay its per-reap costs (a clock read,
 * the reap bookkeeping) per I/O at any depth. fio reaps whatever count
 * getevents returns.
 */
static int wc_getevents(struct thread_data *td, unsigned int min, unsigned int max,
			const struct timespec *t)
{
	int64_t ns = t ? (int64_t)t->tv_sec * 1000000000LL + t->tv_nsec : -1;

	(void)max;
	return wc_fio_job_getevents(td->io_ops_data, min, ns);
}

static struct io_u *wc_event(struct thread_data *td, int event)
{
	int err = 0;
	struct io_u *io_u = wc_fio_job_event(td->io_ops_data, event, &err);

	if (io_u)
		io_u->error = err;
	return io_u;
}

static void wc_cleanup(struct thread_data *td)
{
	if (td->io_ops_data) {
		wc_fio_job_free(td->io_ops_data);
		td->io_ops_data = NULL;
	}
}

/* Exported: ioengine=external:<path> finds it by this name. */
struct ioengine_ops ioengine = {
	.name = ENGINE,
	.version = FIO_IOOPS_VERSION,
	.flags = FIO_RAWIO | FIO_NOEXTEND | FIO_NODISKUTIL | FIO_MEMALIGN | FIO_DISKLESSIO,
	.setup = wc_setup,
	.init = wc_init,
	.queue = wc_queue,
	.getevents = wc_getevents,
	.event = wc_event,
	.cleanup = wc_cleanup,
	.open_file = wc_open,
	.close_file = wc_close,
	.invalidate = wc_invalidate,
	.option_struct_size = sizeof(struct wc_fio_options),
	.options = options,
};

/* For loaders that prefer a function (fio tries it after `ioengine`). */
void get_ioengine(struct ioengine_ops **ops)
{
	*ops = &ioengine;
}

static void fio_init wc_fio_register(void)
{
	if (register_ioengine)
		register_ioengine(&ioengine);
}

static void fio_exit wc_fio_unregister(void)
{
	if (!unregister_ioengine)
		return;
	/* Stop bdevs (a writecache commits) and reactors before fio is gone. */
	wc_fio_env_stop();
	unregister_ioengine(&ioengine);
}
