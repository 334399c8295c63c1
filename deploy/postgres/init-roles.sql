-- Run once by the postgres image on its first start (docker-compose.yml mounts it into
-- /docker-entrypoint-initdb.d/): the roles and database the migrations expect, as `pipeline stack up`
-- creates them locally. The schema owner runs the migrations; the stages connect as the application role,
-- which may only append ledger lines (migration 0002 grants its rights).
CREATE ROLE pipeline_owner LOGIN PASSWORD 'pipeline_owner';
CREATE ROLE pipeline LOGIN PASSWORD 'pipeline';
CREATE DATABASE pipeline OWNER pipeline_owner;
