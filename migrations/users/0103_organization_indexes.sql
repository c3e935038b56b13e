-- At most one pending invitation per address and organization (a new one
-- revokes the old under the organization's lock; this makes it a rule).
CREATE UNIQUE INDEX invitations_pending ON invitations (org_id, email)
    WHERE accepted_at IS NULL AND declined_at IS NULL AND revoked_at IS NULL;
-- Dissolving an organization ends every member's sessions acting for it.
CREATE INDEX refresh_tokens_by_tenant ON refresh_tokens (tenant);
-- (0102 says removal revokes "the families acting for it": precisely, each
-- family whose current token acts for the organization, revoked whole.)
