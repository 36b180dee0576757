/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The names of the D-Bus API (docs/api.md, dbus/org.blockstream1.*.xml), one home for the daemon
 * (service/) and the CLI (ctl/). Only #defines: it includes nothing and anyone may include it.
 *
 * tests/unit/test-api-doc.py checks the BS_<INTERFACE>_{METHOD,PROPERTY,SIGNAL}_* names against
 * the XML (each names a member of its interface, each member has one), and
 * tests/integration/test_manager.py the XML against the live objects: a name that drifts fails
 * a test. Names the daemon used before this header (BUS_NAME, MANAGER_PATH, …, ACTION_*,
 * BS_ERROR_*) keep their spelling. */

/* Bus name and objects */
#define BUS_NAME "org.blockstream1"
#define MANAGER_PATH "/org/blockstream1"
/* /org/blockstream1/guest/<name> and …/<name>/<disk>, each path-escaped (sd_bus_path_encode). */
#define GUEST_PATH_PREFIX "/org/blockstream1/guest"
/* /org/blockstream1/export/<id>, the id unescaped ([A-Za-z0-9_]). */
#define EXPORT_PATH_PREFIX "/org/blockstream1/export"
/* /org/blockstream1/cache/<n>. */
#define CACHE_PATH_PREFIX "/org/blockstream1/cache"

/* Interfaces */
#define MANAGER_INTERFACE "org.blockstream1.Manager"
#define GUEST_INTERFACE "org.blockstream1.Guest"
#define STREAM_INTERFACE "org.blockstream1.BlockStream"
#define EXPORT_INTERFACE "org.blockstream1.Export"
#define CACHE_INTERFACE "org.blockstream1.Cache"

/* org.blockstream1.Manager */
#define BS_MANAGER_METHOD_REGISTER_GUEST "RegisterGuest"
#define BS_MANAGER_METHOD_UNREGISTER_GUEST "UnregisterGuest"
#define BS_MANAGER_METHOD_GET_GUEST "GetGuest"
#define BS_MANAGER_METHOD_PROVISION_DISK "ProvisionDisk"
#define BS_MANAGER_PROPERTY_VERSION "Version"

/* org.blockstream1.Guest */
#define BS_GUEST_METHOD_UNREGISTER "Unregister"
#define BS_GUEST_METHOD_REFRESH "Refresh"
#define BS_GUEST_PROPERTY_NAME "Name"
#define BS_GUEST_PROPERTY_UUID "UUID"
#define BS_GUEST_PROPERTY_OWNER "Owner"
#define BS_GUEST_PROPERTY_RUNNING "Running"
#define BS_GUEST_PROPERTY_QMP_SOCKET "QMPSocket"
#define BS_GUEST_PROPERTY_DISKS "Disks"
#define BS_GUEST_PROPERTY_SANDBOX_LABEL "SandboxLabel"

/* org.blockstream1.BlockStream */
#define BS_STREAM_METHOD_START "Start"
#define BS_STREAM_METHOD_CANCEL "Cancel"
#define BS_STREAM_METHOD_PAUSE "Pause"
#define BS_STREAM_METHOD_RESUME "Resume"
#define BS_STREAM_METHOD_SET_BANDWIDTH "SetBandwidth"
#define BS_STREAM_METHOD_SET_MAX_GUEST_LATENCY "SetMaxGuestLatency"
#define BS_STREAM_METHOD_GET_ALLOCATION_MAP "GetAllocationMap"
#define BS_STREAM_METHOD_EXPORT "Export"
#define BS_STREAM_SIGNAL_FINISHED "Finished"
#define BS_STREAM_PROPERTY_GUEST "Guest"
#define BS_STREAM_PROPERTY_DEVICE "Device"
#define BS_STREAM_PROPERTY_TARGET "Target"
#define BS_STREAM_PROPERTY_NODE_NAME "NodeName"
#define BS_STREAM_PROPERTY_PATH "Path"
#define BS_STREAM_PROPERTY_BACKING_CHAIN "BackingChain"
#define BS_STREAM_PROPERTY_SIZE "Size"
#define BS_STREAM_PROPERTY_STATE "State"
#define BS_STREAM_PROPERTY_MODE "Mode"
#define BS_STREAM_PROPERTY_OFFSET "Offset"
#define BS_STREAM_PROPERTY_LENGTH "Length"
#define BS_STREAM_PROPERTY_BYTES_DONE "BytesDone"
#define BS_STREAM_PROPERTY_BYTES_TOTAL "BytesTotal"
#define BS_STREAM_PROPERTY_BANDWIDTH "Bandwidth"
#define BS_STREAM_PROPERTY_RATE "Rate"
#define BS_STREAM_PROPERTY_START_TIME "StartTime"
#define BS_STREAM_PROPERTY_EXPECTED_END_TIME "ExpectedEndTime"
#define BS_STREAM_PROPERTY_ERROR "Error"
#define BS_STREAM_PROPERTY_MAX_GUEST_LATENCY "MaxGuestLatency"
#define BS_STREAM_PROPERTY_GUEST_READ_P99 "GuestReadP99"
#define BS_STREAM_PROPERTY_SPEED_LIMIT "SpeedLimit"
#define BS_STREAM_PROPERTY_THROTTLE_REASON "ThrottleReason"
#define BS_STREAM_PROPERTY_ENGINE "Engine"

/* org.blockstream1.Export */
#define BS_EXPORT_METHOD_STOP "Stop"
#define BS_EXPORT_PROPERTY_URI "URI"
#define BS_EXPORT_PROPERTY_DISK "Disk"
#define BS_EXPORT_PROPERTY_CLIENTS "Clients"
#define BS_EXPORT_PROPERTY_STATE "State"
#define BS_EXPORT_PROPERTY_ERROR "Error"

/* org.blockstream1.Cache */
#define BS_CACHE_METHOD_STOP "Stop"
#define BS_CACHE_METHOD_WARM "Warm"
#define BS_CACHE_PROPERTY_URL "URL"
#define BS_CACHE_PROPERTY_SIZE "Size"
#define BS_CACHE_PROPERTY_SOCKET "Socket"
#define BS_CACHE_PROPERTY_USERS "Users"
#define BS_CACHE_PROPERTY_STATE "State"
#define BS_CACHE_PROPERTY_BYTES_FETCHED "BytesFetched"
#define BS_CACHE_PROPERTY_CLIENTS "Clients"

/* The keys of the methods' a{sv} options */
#define BS_OPTION_OWNER "owner"                     /* RegisterGuest, u */
#define BS_OPTION_UUID "uuid"                       /* RegisterGuest, s */
#define BS_OPTION_DISKS "disks"                     /* RegisterGuest, a{ss} alias → image path */
#define BS_OPTION_FORMATS "formats"                 /* RegisterGuest, a{ss} alias → qcow2|raw */
#define BS_OPTION_DISK_NAMES "disk_names"           /* RegisterGuest, a{ss} alias → name (Target) */
#define BS_OPTION_TEMPLATE_FORMAT "template_format" /* ProvisionDisk, s */
#define BS_OPTION_SIZE "size"                       /* ProvisionDisk, t */
#define BS_OPTION_CACHE "cache"                     /* ProvisionDisk, b */
#define BS_OPTION_BANDWIDTH "bandwidth"             /* Start, t */
#define BS_OPTION_BASE "base"                       /* Start, s */
#define BS_OPTION_MAX_GUEST_LATENCY "max_guest_latency" /* Start, t (µs) */
#define BS_OPTION_ENGINE "engine"                   /* Start, s: auto, stream, prefetch, mirror */
#define BS_OPTION_LISTEN "listen"                   /* Export, s: "unix" or "tcp:ADDR:PORT" */

/* BlockStream.State, and Finished's result (one of the last three) */
#define BS_STATE_IDLE "idle"
#define BS_STATE_RUNNING "running"
#define BS_STATE_PAUSED "paused"
#define BS_STATE_COMPLETED "completed"
#define BS_STATE_FAILED "failed"
#define BS_STATE_CANCELLED "cancelled"

/* BlockStream.Mode */
#define BS_MODE_NONE ""
#define BS_MODE_FULL "full"
#define BS_MODE_RANGE "range"

/* BlockStream.ThrottleReason */
#define BS_THROTTLE_OFF "off"
#define BS_THROTTLE_IDLE "idle"
#define BS_THROTTLE_PROBING "probing"
#define BS_THROTTLE_STEADY "steady"
#define BS_THROTTLE_YIELDING "yielding"
#define BS_THROTTLE_CEILING "ceiling"

/* BlockStream.Engine (which engine runs or ran the job), and Start's option "engine" (but "range"
 * and ""; plus "auto", and "mirror", refused as not available yet) */
#define BS_ENGINE_NONE ""
#define BS_ENGINE_STREAM "stream"
#define BS_ENGINE_PREFETCH "prefetch"
#define BS_ENGINE_RANGE "range"
#define BS_ENGINE_AUTO "auto"
#define BS_ENGINE_MIRROR "mirror"

/* Export.State */
#define BS_EXPORT_STATE_SERVING "serving"
#define BS_EXPORT_STATE_STOPPED "stopped"
#define BS_EXPORT_STATE_FAILED "failed"

/* GetAllocationMap's extent kinds */
#define BS_EXTENT_LOCAL "local"
#define BS_EXTENT_ZERO "zero"
#define BS_EXTENT_BACKING "backing"
#define BS_EXTENT_ABSENT "absent"

/* The error names. Messages say what was wrong and what to do. */
#define BS_ERROR_NO_SUCH_GUEST "org.blockstream1.Error.NoSuchGuest"
#define BS_ERROR_NO_SUCH_DISK "org.blockstream1.Error.NoSuchDisk"
#define BS_ERROR_GUEST_EXISTS "org.blockstream1.Error.GuestExists"
#define BS_ERROR_BUSY "org.blockstream1.Error.Busy"
#define BS_ERROR_NOT_RUNNING "org.blockstream1.Error.NotRunning"
#define BS_ERROR_INVALID_RANGE "org.blockstream1.Error.InvalidRange"
#define BS_ERROR_QEMU_FAILED "org.blockstream1.Error.QemuFailed"
#define BS_ERROR_HELPER_FAILED "org.blockstream1.Error.HelperFailed"
#define BS_ERROR_NO_SPACE "org.blockstream1.Error.NoSpace"

/* The polkit actions (policy/org.blockstream1.policy) */
#define ACTION_MANAGE "org.blockstream1.manage"
#define ACTION_STREAM "org.blockstream1.stream"
#define ACTION_INSPECT "org.blockstream1.inspect"
#define ACTION_EXPORT "org.blockstream1.export"
