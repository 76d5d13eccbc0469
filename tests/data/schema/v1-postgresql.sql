--
-- PostgreSQL database dump
--

\restrict SOXnrcrzvFbbew4Y3fzsjTdMHAwC5Ekp4mONzwjzE57rOVSX0blIA2TyWwQtzTh

-- Dumped from database version 15.18 (Debian 15.18-0+deb12u1)
-- Dumped by pg_dump version 15.18 (Debian 15.18-0+deb12u1)

SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

SET default_tablespace = '';

SET default_table_access_method = heap;

--
-- Name: deliveries; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.deliveries (
    id integer NOT NULL,
    result_id integer NOT NULL,
    destination character varying(64) NOT NULL,
    kind character varying(16) NOT NULL,
    path text NOT NULL,
    state character varying(16) NOT NULL,
    attempts integer NOT NULL,
    next_attempt_at timestamp without time zone NOT NULL,
    last_error text,
    updated_at timestamp without time zone NOT NULL
);


--
-- Name: deliveries_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.deliveries_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: deliveries_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.deliveries_id_seq OWNED BY public.deliveries.id;


--
-- Name: events; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.events (
    id integer NOT NULL,
    at timestamp without time zone NOT NULL,
    level character varying(8) NOT NULL,
    kind character varying(32) NOT NULL,
    subject character varying(64) NOT NULL,
    message text NOT NULL
);


--
-- Name: events_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.events_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: events_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.events_id_seq OWNED BY public.events.id;


--
-- Name: instances; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.instances (
    sop_instance_uid character varying(64) NOT NULL,
    study_instance_uid character varying(64) NOT NULL,
    series_instance_uid character varying(64) NOT NULL,
    sop_class_uid character varying(64) NOT NULL,
    path text NOT NULL,
    size integer NOT NULL,
    calling_ae character varying(16) NOT NULL,
    state character varying(16) NOT NULL,
    skip_reason text,
    received_at timestamp without time zone NOT NULL
);


--
-- Name: jobs; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.jobs (
    id integer NOT NULL,
    study_instance_uid character varying(64) NOT NULL,
    instance_set character varying(64) NOT NULL,
    instance_uids text NOT NULL,
    bundle_version character varying(64) NOT NULL,
    state character varying(16) NOT NULL,
    attempts integer NOT NULL,
    lease_owner character varying(128),
    lease_expires_at timestamp without time zone,
    last_error text,
    created_at timestamp without time zone NOT NULL,
    updated_at timestamp without time zone NOT NULL
);


--
-- Name: jobs_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.jobs_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: jobs_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.jobs_id_seq OWNED BY public.jobs.id;


--
-- Name: results; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.results (
    id integer NOT NULL,
    job_id integer NOT NULL,
    study_instance_uid character varying(64) NOT NULL,
    verdict character varying(32) NOT NULL,
    risk_tier character varying(32),
    abnormality_score double precision,
    result_json text NOT NULL,
    sr_sop_instance_uid character varying(64) NOT NULL,
    summary_sop_instance_uid character varying(64) NOT NULL,
    predecessor_id integer,
    created_at timestamp without time zone NOT NULL
);


--
-- Name: results_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.results_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: results_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.results_id_seq OWNED BY public.results.id;


--
-- Name: schema_info; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.schema_info (
    id integer NOT NULL,
    version integer NOT NULL
);


--
-- Name: schema_info_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.schema_info_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: schema_info_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.schema_info_id_seq OWNED BY public.schema_info.id;


--
-- Name: studies; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.studies (
    study_instance_uid character varying(64) NOT NULL,
    state character varying(16) NOT NULL,
    first_received_at timestamp without time zone NOT NULL,
    last_received_at timestamp without time zone NOT NULL
);


--
-- Name: deliveries id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.deliveries ALTER COLUMN id SET DEFAULT nextval('public.deliveries_id_seq'::regclass);


--
-- Name: events id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.events ALTER COLUMN id SET DEFAULT nextval('public.events_id_seq'::regclass);


--
-- Name: jobs id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.jobs ALTER COLUMN id SET DEFAULT nextval('public.jobs_id_seq'::regclass);


--
-- Name: results id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.results ALTER COLUMN id SET DEFAULT nextval('public.results_id_seq'::regclass);


--
-- Name: schema_info id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.schema_info ALTER COLUMN id SET DEFAULT nextval('public.schema_info_id_seq'::regclass);


--
-- Data for Name: deliveries; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.deliveries VALUES (1, 1, 'pacs', 'sr', 'outbox/1/sr.dcm', 'sent', 1, '2026-11-20 10:00:00', NULL, '2026-11-20 10:00:00');
INSERT INTO public.deliveries VALUES (2, 1, 'pacs', 'summary', 'outbox/1/summary.dcm', 'sent', 1, '2026-11-20 10:00:00', NULL, '2026-11-20 10:00:00');


--
-- Data for Name: events; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.events VALUES (1, '2026-11-20 10:00:00', 'INFO', 'received', 'abc123', 'instance received');


--
-- Data for Name: instances; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.instances VALUES ('1.2.826.0.1.3680043.10.1.1.1', '1.2.826.0.1.3680043.10.1.1', '1.2.826.0.1.3680043.10.1.1.0', '1.2.840.10008.5.1.4.1.1.1.1', 'instances/1.2.826.0.1.3680043.10.1.1/1.2.826.0.1.3680043.10.1.1.1.dcm', 1000, 'PACS', 'stored', NULL, '2026-11-20 10:00:00');
INSERT INTO public.instances VALUES ('1.2.826.0.1.3680043.10.1.2.1', '1.2.826.0.1.3680043.10.1.2', '1.2.826.0.1.3680043.10.1.2.0', '1.2.840.10008.5.1.4.1.1.1.1', 'instances/1.2.826.0.1.3680043.10.1.2/1.2.826.0.1.3680043.10.1.2.1.dcm', 1000, 'PACS', 'stored', NULL, '2026-11-20 10:00:00');


--
-- Data for Name: jobs; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.jobs VALUES (1, '1.2.826.0.1.3680043.10.1.1', 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa', '["1.2.826.0.1.3680043.10.1.1.1"]', '0.1.0', 'done', 1, NULL, NULL, NULL, '2026-11-20 10:00:00', '2026-11-20 10:00:00');


--
-- Data for Name: results; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.results VALUES (1, 1, '1.2.826.0.1.3680043.10.1.1', 'abnormal', 'critical', 0.9, '{}', '1.2.826.0.1.3680043.10.1.1.9', '1.2.826.0.1.3680043.10.1.1.8', NULL, '2026-11-20 10:00:00');


--
-- Data for Name: schema_info; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.schema_info VALUES (1, 1);


--
-- Data for Name: studies; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.studies VALUES ('1.2.826.0.1.3680043.10.1.1', 'reported', '2026-11-20 10:00:00', '2026-11-20 10:00:00');
INSERT INTO public.studies VALUES ('1.2.826.0.1.3680043.10.1.2', 'receiving', '2026-11-20 10:00:00', '2026-11-20 10:00:00');


--
-- Name: deliveries_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.deliveries_id_seq', 2, true);


--
-- Name: events_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.events_id_seq', 1, true);


--
-- Name: jobs_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.jobs_id_seq', 1, true);


--
-- Name: results_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.results_id_seq', 1, true);


--
-- Name: schema_info_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.schema_info_id_seq', 1, false);


--
-- Name: deliveries deliveries_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.deliveries
    ADD CONSTRAINT deliveries_pkey PRIMARY KEY (id);


--
-- Name: events events_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.events
    ADD CONSTRAINT events_pkey PRIMARY KEY (id);


--
-- Name: instances instances_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.instances
    ADD CONSTRAINT instances_pkey PRIMARY KEY (sop_instance_uid);


--
-- Name: jobs jobs_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.jobs
    ADD CONSTRAINT jobs_pkey PRIMARY KEY (id);


--
-- Name: results results_job_id_key; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.results
    ADD CONSTRAINT results_job_id_key UNIQUE (job_id);


--
-- Name: results results_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.results
    ADD CONSTRAINT results_pkey PRIMARY KEY (id);


--
-- Name: schema_info schema_info_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.schema_info
    ADD CONSTRAINT schema_info_pkey PRIMARY KEY (id);


--
-- Name: studies studies_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.studies
    ADD CONSTRAINT studies_pkey PRIMARY KEY (study_instance_uid);


--
-- Name: deliveries uq_delivery; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.deliveries
    ADD CONSTRAINT uq_delivery UNIQUE (result_id, destination, kind);


--
-- Name: jobs uq_job_input; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.jobs
    ADD CONSTRAINT uq_job_input UNIQUE (study_instance_uid, instance_set, bundle_version);


--
-- Name: ix_deliveries_state_next; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_deliveries_state_next ON public.deliveries USING btree (state, next_attempt_at);


--
-- Name: ix_events_at; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_events_at ON public.events USING btree (at);


--
-- Name: ix_instances_study_instance_uid; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_instances_study_instance_uid ON public.instances USING btree (study_instance_uid);


--
-- Name: ix_jobs_state_id; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_jobs_state_id ON public.jobs USING btree (state, id);


--
-- Name: ix_jobs_study_instance_uid; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_jobs_study_instance_uid ON public.jobs USING btree (study_instance_uid);


--
-- Name: ix_results_study_instance_uid; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_results_study_instance_uid ON public.results USING btree (study_instance_uid);


--
-- Name: ix_studies_state; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_studies_state ON public.studies USING btree (state);


--
-- Name: deliveries deliveries_result_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.deliveries
    ADD CONSTRAINT deliveries_result_id_fkey FOREIGN KEY (result_id) REFERENCES public.results(id);


--
-- Name: results results_job_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.results
    ADD CONSTRAINT results_job_id_fkey FOREIGN KEY (job_id) REFERENCES public.jobs(id);


--
-- Name: results results_predecessor_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.results
    ADD CONSTRAINT results_predecessor_id_fkey FOREIGN KEY (predecessor_id) REFERENCES public.results(id);


--
-- PostgreSQL database dump complete
--

\unrestrict SOXnrcrzvFbbew4Y3fzsjTdMHAwC5Ekp4mONzwjzE57rOVSX0blIA2TyWwQtzTh

