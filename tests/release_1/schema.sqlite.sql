-- Release 1's schema on SQLite: the statements its init-db ran (metadata.create_all),
-- frozen here so that tests can build a database as that release left it.

CREATE TABLE mailslot_meta (
	"key" VARCHAR(64) NOT NULL,
	value VARCHAR(255) NOT NULL,
	PRIMARY KEY ("key")
);

CREATE TABLE users (
	id INTEGER NOT NULL,
	email VARCHAR(254) NOT NULL,
	password_hash VARCHAR(255) NOT NULL,
	email_confirmed_at DATETIME,
	session_version INTEGER NOT NULL,
	created_at DATETIME NOT NULL,
	PRIMARY KEY (id),
	UNIQUE (email)
);

CREATE TABLE forms (
	id INTEGER NOT NULL,
	public_id VARCHAR(32) NOT NULL,
	owner_id INTEGER NOT NULL,
	name VARCHAR(200) NOT NULL,
	fields JSON NOT NULL,
	schema_version INTEGER NOT NULL,
	strict BOOLEAN NOT NULL,
	redirect_url VARCHAR(2000),
	allowed_domains JSON NOT NULL,
	honeypot_field VARCHAR(64) NOT NULL,
	webhook_url VARCHAR(2000),
	webhook_secret VARCHAR(100),
	notify BOOLEAN NOT NULL,
	retention_days INTEGER,
	description TEXT NOT NULL,
	thanks_message TEXT NOT NULL,
	show_branding BOOLEAN NOT NULL,
	spam_rules JSON NOT NULL,
	status VARCHAR(16) NOT NULL,
	created_at DATETIME NOT NULL,
	updated_at DATETIME NOT NULL,
	PRIMARY KEY (id),
	UNIQUE (public_id),
	FOREIGN KEY(owner_id) REFERENCES users (id) ON DELETE CASCADE
);

CREATE INDEX ix_forms_owner ON forms (owner_id, id);

CREATE TABLE api_tokens (
	id INTEGER NOT NULL,
	user_id INTEGER NOT NULL,
	name VARCHAR(100) NOT NULL,
	prefix VARCHAR(32) NOT NULL,
	token_hash VARCHAR(64) NOT NULL,
	created_at DATETIME NOT NULL,
	last_used_at DATETIME,
	revoked_at DATETIME,
	PRIMARY KEY (id),
	FOREIGN KEY(user_id) REFERENCES users (id) ON DELETE CASCADE,
	UNIQUE (token_hash)
);

CREATE TABLE submissions (
	id INTEGER NOT NULL,
	public_id VARCHAR(32) NOT NULL,
	form_id INTEGER NOT NULL,
	data JSON NOT NULL,
	schema_version INTEGER NOT NULL,
	is_spam BOOLEAN NOT NULL,
	spam_reason TEXT,
	ip_hash VARCHAR(64),
	user_agent VARCHAR(512),
	referrer VARCHAR(2000),
	meta JSON NOT NULL,
	search_text TEXT NOT NULL,
	created_at DATETIME NOT NULL,
	PRIMARY KEY (id),
	UNIQUE (public_id),
	FOREIGN KEY(form_id) REFERENCES forms (id) ON DELETE CASCADE
);

CREATE INDEX ix_submissions_form_created ON submissions (form_id, created_at, is_spam);

CREATE INDEX ix_submissions_form_id ON submissions (form_id, id);

CREATE TABLE deliveries (
	id INTEGER NOT NULL,
	submission_id INTEGER NOT NULL,
	kind VARCHAR(16) NOT NULL,
	target VARCHAR(2000) NOT NULL,
	status VARCHAR(16) NOT NULL,
	attempts INTEGER NOT NULL,
	next_attempt_at DATETIME NOT NULL,
	last_error TEXT,
	updated_at DATETIME NOT NULL,
	PRIMARY KEY (id),
	FOREIGN KEY(submission_id) REFERENCES submissions (id) ON DELETE CASCADE
);

CREATE INDEX ix_deliveries_submission ON deliveries (submission_id);

CREATE INDEX ix_deliveries_due ON deliveries (status, next_attempt_at);
