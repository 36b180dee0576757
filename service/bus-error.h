/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The error names of api.md (BS_ERROR_*) live with the rest of the API's names. */

#include "blockstream-api.h"
