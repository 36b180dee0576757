/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The BlockStream object as stream.c (its vtable, Start, the properties) and stream-control.c
 * (the methods that steer a running job) share it; nobody else includes this. */

#include <stdbool.h>
#include <stdint.h>
#include <systemd/sd-bus.h>

#include "backend.h"
#include "disk.h"

/* A D-Bus call waiting for QEMU. The Guest outlives every QMP callback (closing the QMP
 * connection drops them), the Disk may not: look it up again by alias. */
typedef struct CallCtx {
        sd_bus_message *msg;
        Guest *guest;
        char *alias;
        bool replied;
        uint64_t bandwidth; /* Start and SetBandwidth: the job's bandwidth */
        uint64_t speed;     /* SetBandwidth, SetMaxGuestLatency: the speed sent (under the guest-latency limit) */
        JobControl control; /* Cancel, Pause, Resume */
        char *job_id;
        char *base_node;
        char *backing_file;
        bool resume, resume_paused; /* stream_resume_offline(): nobody to answer, the job goes on */
} CallCtx;

/* stream.c: the method plumbing both files use. */
int disk_authorize(Disk *d, sd_bus_message *msg, const char *action, sd_bus_error *error);
CallCtx *call_ctx_new(Disk *d, sd_bus_message *msg);
void call_ctx_free(void *p);
void call_reply(CallCtx *c, int error, const char *desc, const char *what);
int check_bandwidth(uint64_t bw, sd_bus_error *error);
int check_max_guest_latency(uint64_t usec, sd_bus_error *error);
int refuse_offline_latency(Disk *d, sd_bus_error *error);

/* stream-control.c: the methods on a job (Cancel, Pause, Resume, SetBandwidth,
 * SetMaxGuestLatency), for stream_vtable. */
int method_cancel(sd_bus_message *msg, void *userdata, sd_bus_error *error);
int method_pause(sd_bus_message *msg, void *userdata, sd_bus_error *error);
int method_resume(sd_bus_message *msg, void *userdata, sd_bus_error *error);
int method_set_bandwidth(sd_bus_message *msg, void *userdata, sd_bus_error *error);
int method_set_max_guest_latency(sd_bus_message *msg, void *userdata, sd_bus_error *error);
