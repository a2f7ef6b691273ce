-- Ids compare byte-wise, as on SQLite: `GET …/members` is "ordered by user id" (SPEC §4),
-- and a database created with a natural-language collation (en_US.UTF-8, ICU) would
-- otherwise sort `Bob` after `alice` and `_z` before `Bob`. Ids are ASCII (SPEC), so
-- "C" order is code point order.
ALTER TABLE org_members
    ALTER COLUMN org_id TYPE TEXT COLLATE "C",
    ALTER COLUMN user_id TYPE TEXT COLLATE "C";
