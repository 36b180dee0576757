/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The host's template caches: list, warm, stop. */

int verb_caches(char **args);
int verb_cache_warm(char **args);
int verb_cache_stop(char **args);
