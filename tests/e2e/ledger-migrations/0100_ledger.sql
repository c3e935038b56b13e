-- The ledger test service: members (from users' events) and their notes.
CREATE TABLE members (
    user_id TEXT PRIMARY KEY,
    email TEXT NOT NULL,
    joined_at BIGINT NOT NULL
);

CREATE TABLE notes (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES members (user_id),
    note TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    CONSTRAINT notes_user_note_key UNIQUE (user_id, note)
);
