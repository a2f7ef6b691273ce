-- Read state (docs/protocol.md, "Presence and read state"): the highest offset each user
-- has marked read in each channel, with the channel's epoch at the time.
CREATE TABLE IF NOT EXISTS read_state (
    user_id     TEXT NOT NULL,
    channel     TEXT NOT NULL,
    epoch       TEXT NOT NULL,
    read_offset BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (user_id, channel)
);
