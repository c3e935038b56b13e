-- Organizations (tenants): teams that subscribe and pay as one subject.
-- Each has members with a role (owner, admin = the tenant admin, member),
-- its own tier (a projection of its subscription events, like a user's),
-- and optional company details printed on its invoices. An organization
-- is never deleted while invoices may name it: `deleted_at` dissolves it.
CREATE TABLE organizations (
    id TEXT PRIMARY KEY,
    slug TEXT NOT NULL,
    name TEXT NOT NULL,
    legal_name TEXT,
    -- 16 digits (a 15-digit NPWP is stored with a leading 0).
    npwp TEXT,
    -- 22 digits: the NPWP and a 6-digit place of business.
    nitku TEXT,
    address TEXT,
    tier TEXT NOT NULL,
    tier_changed_at BIGINT NOT NULL,
    created_by TEXT NOT NULL REFERENCES users (id),
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    deleted_at BIGINT,
    CONSTRAINT organizations_slug_key UNIQUE (slug)
);

CREATE TABLE memberships (
    org_id TEXT NOT NULL REFERENCES organizations (id),
    user_id TEXT NOT NULL REFERENCES users (id),
    role TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (org_id, user_id)
);
CREATE INDEX memberships_user ON memberships (user_id);

-- Single-use, expiring invitations by e-mail; the token only as a hash.
CREATE TABLE invitations (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES organizations (id),
    email TEXT NOT NULL,
    role TEXT NOT NULL,
    token_hash TEXT NOT NULL,
    invited_by TEXT NOT NULL REFERENCES users (id),
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    accepted_at BIGINT,
    declined_at BIGINT,
    revoked_at BIGINT,
    CONSTRAINT invitations_token_key UNIQUE (token_hash)
);
CREATE INDEX invitations_org ON invitations (org_id, email);

-- The organization a login acts for (NULL: personal). A refresh keeps it;
-- `POST /api/auth/switch` changes it; leaving or being removed from the
-- organization revokes the families acting for it.
ALTER TABLE refresh_tokens ADD COLUMN tenant TEXT;
CREATE INDEX refresh_tokens_tenant ON refresh_tokens (user_id, tenant);
