/* SPDX-License-Identifier: LGPL-2.1-or-later */

/* The BlockStream methods that steer a running job: Cancel, Pause, Resume, SetBandwidth and
 * SetMaxGuestLatency (stream_vtable, in stream.c, lists them). */

#include "adaptive.h"
#include "backend.h"
#include "bus-error.h"
#include "guest.h"
#include "polkit.h"
#include "rangeop.h"
#include "mirror.h"
#include "stream-internal.h"
#include "util.h"

static int require_job(Disk *d, sd_bus_error *error) {
        if (!job_is_active(&d->job) || d->finalizing || !job_backend_of(d)->runs(d))
                return sd_bus_error_setf(error, BS_ERROR_NOT_RUNNING, "No job is running on disk '%s' of guest '%s'.",
                        d->alias, d->guest->name);
        return 0;
}

/* Cancel, Pause, Resume */

static void control_reply(int error, const char *desc, void *userdata) {
        static const char *const what[_JOB_CONTROL_MAX] = {
                [JOB_CONTROL_CANCEL] = "cancel the job",
                [JOB_CONTROL_PAUSE] = "pause the job",
                [JOB_CONTROL_RESUME] = "resume the job",
        };
        CallCtx *c = userdata;

        call_reply(c, error, desc, what[c->control]);
}

static int job_method(sd_bus_message *msg, Disk *d, JobControl op, sd_bus_error *error) {
        const JobBackend *b = job_backend_of(d);
        CallCtx *c;
        int r;

        r = disk_authorize(d, msg, ACTION_STREAM, error);
        if (r < 0)
                return r;
        if (r == 0)
                return 1; /* polkit was asked; the call is dispatched again with its answer */
        r = require_job(d, error);
        if (r < 0)
                return r;
        if (!b->reachable(d))
                return sd_bus_error_setf(error, BS_ERROR_NOT_RUNNING,
                        "No QMP connection to the QEMU running the job of disk '%s'; it cannot be changed now.",
                        d->alias);
        /* A mirror past FINALIZE is pivoting (both images alike, the guest's I/O held): a cancel
         * now would send the guest back to the old overlay while the journal says the new image
         * may be the disk. It ends in a moment. */
        if (op == JOB_CONTROL_CANCEL && d->job.engine == STREAM_ENGINE_MIRROR && d->job.phase >= MIRROR_STEP_FINALIZE)
                return sd_bus_error_setf(error, BS_ERROR_BUSY,
                        "The mirror of disk '%s' is pivoting onto its new image; it cannot be cancelled now.",
                        d->alias);
        /* Already where the caller wants it: nothing to ask QEMU. */
        if ((op == JOB_CONTROL_PAUSE && d->job.state == STREAM_PAUSED) ||
                (op == JOB_CONTROL_RESUME && d->job.state == STREAM_RUNNING))
                return sd_bus_reply_method_return(msg, NULL);

        c = call_ctx_new(d, msg);
        if (!c)
                return -ENOMEM;
        c->control = op;
        r = b->control(d, op, control_reply, c, call_ctx_free);
        if (r < 0) {
                c->replied = true;
                call_ctx_free(c);
                return sd_bus_error_set_errnof(error, -r, "%s: %m", b->control_error);
        }
        return 1;
}

int method_cancel(sd_bus_message *msg, void *userdata, sd_bus_error *error) {
        return job_method(msg, userdata, JOB_CONTROL_CANCEL, error);
}

int method_pause(sd_bus_message *msg, void *userdata, sd_bus_error *error) {
        return job_method(msg, userdata, JOB_CONTROL_PAUSE, error);
}

int method_resume(sd_bus_message *msg, void *userdata, sd_bus_error *error) {
        return job_method(msg, userdata, JOB_CONTROL_RESUME, error);
}

/* SetBandwidth's and SetMaxGuestLatency's preamble: 0 when polkit was asked; *ret_backend NULL
 * when no job can be told (the value is the next job's). */
static int job_setting_begin(sd_bus_message *msg, Disk *d, int (*check)(uint64_t, sd_bus_error *), uint64_t *ret,
        const JobBackend **ret_backend, sd_bus_error *error) {
        int r;

        r = sd_bus_message_read(msg, "t", ret);
        if (r < 0)
                return r;
        r = check(*ret, error);
        if (r >= 0)
                r = disk_authorize(d, msg, ACTION_STREAM, error);
        if (r <= 0)
                return r;
        /* A job starting (a Start in flight, a job carried on whose helper starts, a prefetch's cut
         * being sent) takes the values it was given, and one whose helper has ended (a range's end,
         * a prefetch between its phases) has nothing to tell: try again in a moment. */
        if (d->starting || range_op_ending_on(d))
                return sd_bus_error_setf(error, BS_ERROR_BUSY,
                        "The job of disk '%s' is starting or between its phases; it can be changed in a moment.",
                        d->alias);
        *ret_backend = job_backend_of(d);
        if (!job_is_active(&d->job) || d->finalizing) {
                *ret_backend = NULL;
                return 1;
        }
        /* A job that cannot be told: refused with nothing changed (a new default alone, answered as
         * success, would leave the job at its old speed when it goes on). As Cancel, Pause and
         * Resume: one carried on after a restart whose helper or QEMU job is not back yet, */
        if (!(*ret_backend)->runs(d))
                return sd_bus_error_setf(error, BS_ERROR_NOT_RUNNING,
                        "The job of disk '%s' has no helper or QEMU job running now (it is being carried on after a "
                        "restart); it cannot be changed until it runs again.",
                        d->alias);
        /* or one in a QEMU the daemon has no QMP connection to. */
        if (!(*ret_backend)->reachable(d))
                return sd_bus_error_setf(error, BS_ERROR_NOT_RUNNING,
                        "No QMP connection to the QEMU running the job of disk '%s'; it cannot be changed now.",
                        d->alias);
        return 1;
}

/* Tell b the job's new speed (under the guest-latency limit); the reply answers msg. */
static int send_speed(Disk *d, sd_bus_message *msg, const JobBackend *b, uint64_t bandwidth, uint64_t speed,
        job_backend_reply_t reply, sd_bus_error *error) {
        CallCtx *c = call_ctx_new(d, msg);
        int r;

        if (!c)
                return -ENOMEM;
        c->bandwidth = bandwidth;
        c->speed = speed;
        r = b->set_speed(d, speed, reply, c, call_ctx_free);
        if (r < 0) {
                c->replied = true;
                call_ctx_free(c);
                return sd_bus_error_set_errnof(error, -r, "%s: %m", b->speed_error);
        }
        return 1;
}

/* SetBandwidth */

static void set_speed_reply(int error, const char *desc, void *userdata) {
        CallCtx *c = userdata;
        Disk *d = guest_find_disk(c->guest, c->alias);

        /* The job ended meanwhile: then there was no job to tell, and the value is the next one's. */
        if (error == -EREMOTEIO && d && (d->job.concluded || d->finalizing || !job_is_active(&d->job)))
                error = 0;
        if (error == 0 && d) {
                d->bandwidth = c->bandwidth;
                d->job.bandwidth = c->bandwidth;
                /* The guest-latency mode keeps below the new ceiling. */
                adaptive_ceiling_applied(d, c->bandwidth, c->speed);
                disk_emit_changed(d, "Bandwidth", NULL);
                disk_save_later(d);
        }
        call_reply(c, error, desc, "change the bandwidth");
}

int method_set_bandwidth(sd_bus_message *msg, void *userdata, sd_bus_error *error) {
        const JobBackend *b;
        Disk *d = userdata;
        uint64_t bw;
        int r;

        r = job_setting_begin(msg, d, check_bandwidth, &bw, &b, error);
        if (r <= 0)
                return r < 0 ? r : 1;
        if (!b) {
                /* No job to tell: it becomes the default of the next one. */
                if (d->bandwidth != bw) {
                        d->bandwidth = bw;
                        disk_emit_changed(d, "Bandwidth", NULL);
                        disk_save_later(d);
                }
                return sd_bus_reply_method_return(msg, NULL);
        }
        return send_speed(d, msg, b, bw, adaptive_speed_for_ceiling(d, bw), set_speed_reply, error);
}

/* SetMaxGuestLatency */

static void latency_off_reply(int error, const char *desc, void *userdata) {
        CallCtx *c = userdata;

        call_reply(c, error, desc, "give the job its fixed bandwidth back");
}

static void set_max_guest_latency(Disk *d, uint64_t usec) {
        if (d->max_guest_latency == usec)
                return;
        d->max_guest_latency = usec;
        disk_emit_changed(d, "MaxGuestLatency", NULL);
        disk_save_later(d);
}

int method_set_max_guest_latency(sd_bus_message *msg, void *userdata, sd_bus_error *error) {
        const JobBackend *b;
        Disk *d = userdata;
        uint64_t usec, target;
        int r;

        r = job_setting_begin(msg, d, check_max_guest_latency, &usec, &b, error);
        if (r <= 0)
                return r < 0 ? r : 1;
        if (usec > 0 && d->guest->offline)
                return refuse_offline_latency(d, error);
        if (!b) {
                /* No job to steer: it becomes the default of the next one. */
                set_max_guest_latency(d, usec);
                return sd_bus_reply_method_return(msg, NULL);
        }
        if (usec > 0) {
                /* The controller takes over from the next window on. */
                r = adaptive_start(d, usec, d->bandwidth);
                if (r < 0)
                        return r;
                set_max_guest_latency(d, usec);
                disk_save_later(d); /* the job runs in the mode now (its record says), if the value did not change */
                return sd_bus_reply_method_return(msg, NULL);
        }
        if (!d->adaptive) {
                set_max_guest_latency(d, 0);
                return sd_bus_reply_method_return(msg, NULL);
        }
        /* Off: the job runs at its fixed Bandwidth again. The mode ends first (its histogram's
         * removal goes to QEMU before the speed, so both are done when the call is answered, and
         * nothing the mode sends comes after); a speed that cannot be sent turns it on again, as
         * it was, rather than leave the job at the mode's last limit with no mode. */
        target = d->max_guest_latency;
        adaptive_stop(d);
        r = send_speed(d, msg, b, d->bandwidth, d->bandwidth, latency_off_reply, error);
        if (r < 0) {
                if (target > 0 && adaptive_start(d, target, d->bandwidth) < 0)
                        log_warning("Guest %s disk %s: the guest-latency mode is off, the fixed bandwidth not sent.",
                                d->guest->name, d->alias);
                return r;
        }
        set_max_guest_latency(d, 0);
        disk_save_later(d); /* the job runs without the mode now */
        return r;
}
