-- Lars route store schema for MySQL / MariaDB.
--
-- A superset of the original Lars `lars_dns` schema: the same tables and columns with the same
-- names and meaning, so an existing Lars database keeps working. Columns Lars added are
-- appended at the end of their table with defaults (the original C++ DNS reads `SELECT *`
-- positionally), marked "Lars addition" below. Nothing here drops anything: run it on an
-- existing database, or let `lars db init` create what is missing (it also appends missing
-- columns to tables created by the original scripts). `lars db upgrade` brings an existing
-- database all the way: it also widens the original's narrower columns and adds the keys.
--
--   mysql -u root lars_dns < schema.sql      or      lars db init --store mysql://...
--   lars db upgrade --store mysql://... --dry-run      (prints the ALTERs it would run)

CREATE TABLE IF NOT EXISTS `RouteData` (
    `id` int(10) unsigned NOT NULL AUTO_INCREMENT,
    `modid` int(10) unsigned NOT NULL,
    `cmdid` int(10) unsigned NOT NULL,
    `serverip` int(10) unsigned NOT NULL,
    `serverport` int(10) unsigned NOT NULL,
    -- Lars addition (DESIGN §13): the host's share of its module (0 = drained, never chosen)
    -- and its availability zone ('' = none). Appended, with defaults: the original's tools
    -- read and write the first columns only.
    `weight` int(10) unsigned NOT NULL DEFAULT 100,
    `zone` varchar(64) NOT NULL DEFAULT '',
    -- Lars addition (DESIGN §14): a self-registered host's lease, unix milliseconds; the
    -- row is removed once it passes (any DNS instance sweeps). NULL: a static route (the
    -- CLI, the console, an import, the original's tools), which never expires.
    `lease_expires` bigint(20) DEFAULT NULL,
    PRIMARY KEY (`id`),
    -- Lars addition: a host is in a module's route once. Also serves lookups by module.
    -- `lars db upgrade` adds it to an existing database (after removing repeated rows).
    UNIQUE KEY `uniq_node` (`modid`, `cmdid`, `serverip`, `serverport`),
    -- Lars addition (DESIGN §14): the sweep of expired leases reads only those.
    KEY `idx_lease` (`lease_expires`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8;

-- A single row, id = 1. Every route write raises `version`.
CREATE TABLE IF NOT EXISTS `RouteVersion` (
    `id` int(10) unsigned NOT NULL AUTO_INCREMENT,
    `version` int(10) unsigned NOT NULL,
    PRIMARY KEY (`id`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8;

INSERT IGNORE INTO `RouteVersion` (`id`, `version`) VALUES (1, 0);

-- One row per module changed, per version.
CREATE TABLE IF NOT EXISTS `RouteChange` (
    `id` int(10) unsigned NOT NULL AUTO_INCREMENT,
    `modid` int(10) unsigned NOT NULL,
    `cmdid` int(10) unsigned NOT NULL,
    `version` bigint(20) unsigned NOT NULL,
    -- Lars addition: when the row was written; DNS instances purge rows by age.
    `created` timestamp NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (`id`),
    -- Lars addition.
    KEY `idx_version` (`version`),
    -- Lars addition: a module's latest version, for the console.
    KEY `idx_module` (`modid`, `cmdid`, `version`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8;

-- Latest call statistics per node per calling host. succ_cnt/err_cnt: the counts of the
-- latest report (one agent report interval, or the backlog after an outage).
-- modid/cmdid are unsigned here (the original had signed int, too small for uint32 ids).
CREATE TABLE IF NOT EXISTS `ServerCallStatus` (
    `modid` int(10) unsigned NOT NULL,
    `cmdid` int(10) unsigned NOT NULL,
    `ip` int(11) unsigned NOT NULL,
    `port` int(11) unsigned NOT NULL,
    `caller` int(11) unsigned NOT NULL,
    `succ_cnt` int(11) NOT NULL,
    `err_cnt` int(11) NOT NULL,
    `ts` bigint(20) NOT NULL,
    `overload` char(1) NOT NULL,
    -- Lars addition: all successes and failures ever reported for this node by this caller.
    `succ_total` bigint(20) unsigned NOT NULL DEFAULT 0,
    `err_total` bigint(20) unsigned NOT NULL DEFAULT 0,
    PRIMARY KEY (`modid`, `cmdid`, `ip`, `port`, `caller`),
    KEY `mlb_index` (`modid`, `cmdid`, `ip`, `port`, `caller`),
    -- Lars additions: the console's call status filtered by caller, or by overload. Neither
    -- column changes when a report updates a row's counts (overload only when it flips), so
    -- the reporter's upserts rarely touch these keys.
    KEY `idx_caller` (`caller`),
    KEY `idx_overload` (`overload`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8;

-- The names of modids and cmdids ("live streaming lists"), shown by the console.
CREATE TABLE IF NOT EXISTS `ModIDConfig` (
    `id` int(10) unsigned NOT NULL AUTO_INCREMENT,
    `modid` int(10) unsigned NOT NULL,
    `content` char(255) NOT NULL,
    PRIMARY KEY (`id`),
    -- Lars addition: the names of one page of modules.
    KEY `idx_modid` (`modid`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8;

CREATE TABLE IF NOT EXISTS `CmdIDConfig` (
    `id` int(10) unsigned NOT NULL AUTO_INCREMENT,
    `cmdid` int(10) unsigned NOT NULL,
    `content` char(255) NOT NULL,
    PRIMARY KEY (`id`),
    -- Lars addition.
    KEY `idx_cmdid` (`cmdid`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8;

-- Lars addition: who changed a module's route, when, from where, the hosts added and removed
-- (JSON lists of "ip:port") and the version the write produced. One row per module changed,
-- written in the route write's transaction; `actor` is a console user, an API token's name or
-- "cli:USER@HOST", `source` the client's address or "cli".
CREATE TABLE IF NOT EXISTS `RouteAudit` (
    `id` bigint(20) unsigned NOT NULL AUTO_INCREMENT,
    `ts` double NOT NULL,
    `actor` varchar(128) NOT NULL,
    `source` varchar(64) NOT NULL,
    `modid` int(10) unsigned NOT NULL,
    `cmdid` int(10) unsigned NOT NULL,
    `added` mediumtext NOT NULL,
    `removed` mediumtext NOT NULL,
    `version` bigint(20) unsigned NOT NULL,
    -- Lars addition (DESIGN §13): what else the write changed, as a JSON object: hosts'
    -- weight and zone ("hosts": {"ip:port": {"weight": [old, new], ...}}) and the module's
    -- policy ("policy": [old, new], null for none). NULL when it changed hosts only.
    `changes` mediumtext DEFAULT NULL,
    PRIMARY KEY (`id`),
    KEY `idx_module` (`modid`, `cmdid`, `id`),
    KEY `idx_ts` (`ts`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- Lars addition (DESIGN §13): a module's scheduling policy and its parameters; modules
-- without a row use the agents' `[agent.loadbalance]`. A write raises RouteVersion and
-- writes a RouteChange row for the module, like a route write, so DNS pushes it.
CREATE TABLE IF NOT EXISTS `RoutePolicy` (
    `modid` int(10) unsigned NOT NULL,
    `cmdid` int(10) unsigned NOT NULL,
    `policy` varchar(16) NOT NULL DEFAULT 'rr',
    `zone_affinity` tinyint(1) NOT NULL DEFAULT 0,
    `zone_failover` double NOT NULL DEFAULT 0.7,
    `panic_threshold` double NOT NULL DEFAULT 0,
    `slow_start` double NOT NULL DEFAULT 0,
    PRIMARY KEY (`modid`, `cmdid`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- Lars addition: calls to each host of a module per minute, summed over the callers, for the
-- console's charts and the error-rate alarms. `minute` is epoch seconds, a multiple of 60. The
-- reporter adds each batch's calls in the transaction that writes its ServerCallStatus rows,
-- and deletes the minutes older than `[reporter] history_retention` (7 days by default).
CREATE TABLE IF NOT EXISTS `CallHistory` (
    `modid` int(10) unsigned NOT NULL,
    `cmdid` int(10) unsigned NOT NULL,
    `ip` int(10) unsigned NOT NULL,
    `port` int(10) unsigned NOT NULL,
    `minute` bigint(20) NOT NULL,
    `succ` bigint(20) unsigned NOT NULL DEFAULT 0,
    `err` bigint(20) unsigned NOT NULL DEFAULT 0,
    -- A module's minutes together: a chart of the last hour reads an hour, not the retention.
    PRIMARY KEY (`modid`, `cmdid`, `minute`, `ip`, `port`),
    -- The alarms' window over every module, and the purge.
    KEY `idx_minute` (`minute`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- Lars addition: the reporter's batches already stored, by the random token a batch keeps
-- through every re-run. The first statement of a batch's transaction inserts its token; a
-- re-run that finds it there (a COMMIT whose answer was lost with its node, then run again
-- on another) writes nothing, so no call is counted twice. The reporter deletes tokens
-- older than a day.
CREATE TABLE IF NOT EXISTS `ReportBatch` (
    `token` binary(16) NOT NULL,
    `written` bigint(20) NOT NULL,
    PRIMARY KEY (`token`),
    KEY `idx_written` (`written`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- Lars addition: the alarm rules written in the console, by name; `definition` is the rule as
-- a JSON object, `actor` who wrote it last, `updated` when (epoch seconds). The alarm tables
-- compare names as bytes, as SQLite does: "Errors" and "errors" are two rules.
CREATE TABLE IF NOT EXISTS `AlarmRule` (
    `name` varchar(64) NOT NULL,
    `definition` mediumtext NOT NULL,
    `updated` double NOT NULL,
    `actor` varchar(128) NOT NULL,
    PRIMARY KEY (`name`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- Lars addition: the present state of each alarm (a rule applied to one subject: "12/3",
-- "12/3 10.0.0.1:80", "caller 10.0.0.9"), firing (1) or resolved (0) since `since`, with the
-- value and threshold of its last transition, and what was last sent to the webhooks
-- (`notified_firing` NULL: nothing yet). Written only by the instance holding the lease.
CREATE TABLE IF NOT EXISTS `AlarmState` (
    `rule` varchar(64) NOT NULL,
    `subject` varchar(128) NOT NULL,
    `kind` varchar(32) NOT NULL,
    `firing` tinyint(1) NOT NULL,
    `since` double NOT NULL,
    `value` double DEFAULT NULL,
    `threshold` double NOT NULL,
    `modid` int(10) unsigned DEFAULT NULL,
    `cmdid` int(10) unsigned DEFAULT NULL,
    `host` varchar(64) DEFAULT NULL,
    `caller` varchar(64) DEFAULT NULL,
    `updated` double NOT NULL DEFAULT 0,
    `notified_firing` tinyint(1) DEFAULT NULL,
    `notified_at` double NOT NULL DEFAULT 0,
    PRIMARY KEY (`rule`, `subject`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- Lars addition: the history of the alarms, one row per transition (firing or resolved).
CREATE TABLE IF NOT EXISTS `AlarmEvent` (
    `id` bigint(20) unsigned NOT NULL AUTO_INCREMENT,
    `ts` double NOT NULL,
    `rule` varchar(64) NOT NULL,
    `subject` varchar(128) NOT NULL,
    `kind` varchar(32) NOT NULL,
    `firing` tinyint(1) NOT NULL,
    `value` double DEFAULT NULL,
    `threshold` double NOT NULL,
    `modid` int(10) unsigned DEFAULT NULL,
    `cmdid` int(10) unsigned DEFAULT NULL,
    `host` varchar(64) DEFAULT NULL,
    `caller` varchar(64) DEFAULT NULL,
    PRIMARY KEY (`id`),
    KEY `idx_rule` (`rule`, `id`),
    KEY `idx_ts` (`ts`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- Lars addition: who evaluates the alarms (the row named 'alarms'), until when (epoch seconds
-- of the database's clock). With several web instances, only the holder evaluates and sends
-- webhooks; it renews the lease every round, and another takes over once it expires.
CREATE TABLE IF NOT EXISTS `AlarmLease` (
    `name` varchar(32) NOT NULL,
    `holder` varchar(128) NOT NULL,
    `expires` double NOT NULL,
    PRIMARY KEY (`name`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
