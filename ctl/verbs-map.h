/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* Disk data commands: map, export, export-stop. */

int verb_map(char **args);
int verb_export(char **args);
int verb_export_stop(char **args);
