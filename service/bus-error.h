/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The error names of api.md. Messages say what was wrong and what to do. */

#define BS_ERROR_NO_SUCH_GUEST "org.blockstream1.Error.NoSuchGuest"
#define BS_ERROR_NO_SUCH_DISK "org.blockstream1.Error.NoSuchDisk"
#define BS_ERROR_GUEST_EXISTS "org.blockstream1.Error.GuestExists"
#define BS_ERROR_BUSY "org.blockstream1.Error.Busy"
#define BS_ERROR_NOT_RUNNING "org.blockstream1.Error.NotRunning"
#define BS_ERROR_INVALID_RANGE "org.blockstream1.Error.InvalidRange"
#define BS_ERROR_QEMU_FAILED "org.blockstream1.Error.QemuFailed"
#define BS_ERROR_HELPER_FAILED "org.blockstream1.Error.HelperFailed"
