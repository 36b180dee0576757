/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* Guest commands: list, status, register, unregister, provision. */

int verb_list(char **args);
int verb_status(char **args);
int verb_register(char **args);
int verb_unregister(char **args);
int verb_provision(char **args);
