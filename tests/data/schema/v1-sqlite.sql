PRAGMA foreign_keys=OFF;
BEGIN TRANSACTION;
CREATE TABLE schema_info (
	id INTEGER NOT NULL, 
	version INTEGER NOT NULL, 
	PRIMARY KEY (id)
);
INSERT INTO schema_info VALUES(1,1);
CREATE TABLE instances (
	sop_instance_uid VARCHAR(64) NOT NULL, 
	study_instance_uid VARCHAR(64) NOT NULL, 
	series_instance_uid VARCHAR(64) NOT NULL, 
	sop_class_uid VARCHAR(64) NOT NULL, 
	path TEXT NOT NULL, 
	size INTEGER NOT NULL, 
	calling_ae VARCHAR(16) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	skip_reason TEXT, 
	received_at DATETIME NOT NULL, 
	PRIMARY KEY (sop_instance_uid)
);
INSERT INTO instances VALUES('1.2.826.0.1.3680043.10.1.1.1','1.2.826.0.1.3680043.10.1.1','1.2.826.0.1.3680043.10.1.1.0','1.2.840.10008.5.1.4.1.1.1.1','instances/1.2.826.0.1.3680043.10.1.1/1.2.826.0.1.3680043.10.1.1.1.dcm',1000,'PACS','stored',NULL,'2026-11-20 10:00:00.000000');
INSERT INTO instances VALUES('1.2.826.0.1.3680043.10.1.2.1','1.2.826.0.1.3680043.10.1.2','1.2.826.0.1.3680043.10.1.2.0','1.2.840.10008.5.1.4.1.1.1.1','instances/1.2.826.0.1.3680043.10.1.2/1.2.826.0.1.3680043.10.1.2.1.dcm',1000,'PACS','stored',NULL,'2026-11-20 10:00:00.000000');
CREATE TABLE studies (
	study_instance_uid VARCHAR(64) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	first_received_at DATETIME NOT NULL, 
	last_received_at DATETIME NOT NULL, 
	PRIMARY KEY (study_instance_uid)
);
INSERT INTO studies VALUES('1.2.826.0.1.3680043.10.1.1','reported','2026-11-20 10:00:00.000000','2026-11-20 10:00:00.000000');
INSERT INTO studies VALUES('1.2.826.0.1.3680043.10.1.2','receiving','2026-11-20 10:00:00.000000','2026-11-20 10:00:00.000000');
CREATE TABLE jobs (
	id INTEGER NOT NULL, 
	study_instance_uid VARCHAR(64) NOT NULL, 
	instance_set VARCHAR(64) NOT NULL, 
	instance_uids TEXT NOT NULL, 
	bundle_version VARCHAR(64) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	attempts INTEGER NOT NULL, 
	lease_owner VARCHAR(128), 
	lease_expires_at DATETIME, 
	last_error TEXT, 
	created_at DATETIME NOT NULL, 
	updated_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_job_input UNIQUE (study_instance_uid, instance_set, bundle_version)
);
INSERT INTO jobs VALUES(1,'1.2.826.0.1.3680043.10.1.1','aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa','["1.2.826.0.1.3680043.10.1.1.1"]','0.1.0','done',1,NULL,NULL,NULL,'2026-11-20 10:00:00.000000','2026-11-20 10:00:00.000000');
CREATE TABLE events (
	id INTEGER NOT NULL, 
	at DATETIME NOT NULL, 
	level VARCHAR(8) NOT NULL, 
	kind VARCHAR(32) NOT NULL, 
	subject VARCHAR(64) NOT NULL, 
	message TEXT NOT NULL, 
	PRIMARY KEY (id)
);
INSERT INTO events VALUES(1,'2026-11-20 10:00:00.000000','INFO','received','abc123','instance received');
CREATE TABLE results (
	id INTEGER NOT NULL, 
	job_id INTEGER NOT NULL, 
	study_instance_uid VARCHAR(64) NOT NULL, 
	verdict VARCHAR(32) NOT NULL, 
	risk_tier VARCHAR(32), 
	abnormality_score FLOAT, 
	result_json TEXT NOT NULL, 
	sr_sop_instance_uid VARCHAR(64) NOT NULL, 
	summary_sop_instance_uid VARCHAR(64) NOT NULL, 
	predecessor_id INTEGER, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (job_id), 
	FOREIGN KEY(job_id) REFERENCES jobs (id), 
	FOREIGN KEY(predecessor_id) REFERENCES results (id)
);
INSERT INTO results VALUES(1,1,'1.2.826.0.1.3680043.10.1.1','abnormal','critical',0.9000000000000000222,'{}','1.2.826.0.1.3680043.10.1.1.9','1.2.826.0.1.3680043.10.1.1.8',NULL,'2026-11-20 10:00:00.000000');
CREATE TABLE deliveries (
	id INTEGER NOT NULL, 
	result_id INTEGER NOT NULL, 
	destination VARCHAR(64) NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	path TEXT NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	attempts INTEGER NOT NULL, 
	next_attempt_at DATETIME NOT NULL, 
	last_error TEXT, 
	updated_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_delivery UNIQUE (result_id, destination, kind), 
	FOREIGN KEY(result_id) REFERENCES results (id)
);
INSERT INTO deliveries VALUES(1,1,'pacs','sr','outbox/1/sr.dcm','sent',1,'2026-11-20 10:00:00.000000',NULL,'2026-11-20 10:00:00.000000');
INSERT INTO deliveries VALUES(2,1,'pacs','summary','outbox/1/summary.dcm','sent',1,'2026-11-20 10:00:00.000000',NULL,'2026-11-20 10:00:00.000000');
CREATE INDEX ix_instances_study_instance_uid ON instances (study_instance_uid);
CREATE INDEX ix_studies_state ON studies (state);
CREATE INDEX ix_jobs_study_instance_uid ON jobs (study_instance_uid);
CREATE INDEX ix_jobs_state_id ON jobs (state, id);
CREATE INDEX ix_events_at ON events (at);
CREATE INDEX ix_results_study_instance_uid ON results (study_instance_uid);
CREATE INDEX ix_deliveries_state_next ON deliveries (state, next_attempt_at);
COMMIT;
