/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* Stream commands: pull, wait, pause, resume, cancel, set-bandwidth. */

int verb_pull(char **args);
int verb_wait(char **args);
int verb_pause(char **args);
int verb_resume(char **args);
int verb_cancel(char **args);
int verb_set_bandwidth(char **args);
int verb_set_latency(char **args);
