/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The polkit agent: on a terminal, polkit may ask for a password during a call. The server
 * asks polkitd, which asks the agent registered for our process; pkttyagent registers for
 * its parent, so it is our own child, and lives only while a call that needs it runs. */

#include <stdbool.h>

/* polkit's text agent (Debian: pkexec, polkitd). */
#ifndef POLKIT_AGENT_PATH
#define POLKIT_AGENT_PATH "/usr/bin/pkttyagent"
#endif

/* Every call that may need authorization holds the agent while it runs; a verb that makes
 * several such calls holds it across all of them. */
void polkit_agent_acquire(void);
void polkit_agent_release(void);
void polkit_agent_releasep(bool *held);
/* Stops the agent if it runs (at exit, in case a verb returned while holding it). */
void polkit_agent_close(void);
