-- Views over the labels table, created in catalog.duckdb after the catalog's own views.
-- Statements are separated by semicolons (none may appear inside a comment).

-- label_votes: each reader's latest answer per study and choice item
CREATE VIEW label_votes AS
SELECT site_id, batch_id, study_uid, item, reader_id, role, adjudicates, answer, authored
FROM labels
WHERE answer_kind = 'choice'
QUALIFY row_number() OVER (
    PARTITION BY study_uid, item, reader_id, role
    ORDER BY authored DESC NULLS LAST, answer) = 1;

-- label_consensus: per study and item, the readers' majority (more than half of them), or the
-- latest adjudicator's answer, which decides whenever there is one, and without either the study
-- is listed as needing adjudication
CREATE VIEW label_consensus AS
WITH votes AS (
    SELECT site_id, batch_id, study_uid, item, answer, count(*) AS n
    FROM label_votes WHERE NOT adjudicates GROUP BY ALL
), tally AS (
    SELECT site_id, batch_id, study_uid, item, CAST(sum(n) AS INTEGER) AS n_readers,
           CAST(max(n) AS INTEGER) AS top_votes, arg_max(answer, n) AS top_answer
    FROM votes GROUP BY ALL
), adjudicated AS (
    SELECT site_id, batch_id, study_uid, item, answer
    FROM label_votes WHERE adjudicates
    QUALIFY row_number() OVER (PARTITION BY study_uid, item
                               ORDER BY authored DESC NULLS LAST, answer) = 1
)
SELECT site_id, batch_id, study_uid, item,
       coalesce(t.n_readers, 0) AS n_readers,
       CASE WHEN t.top_votes * 2 > t.n_readers THEN t.top_answer END AS majority,
       a.answer AS adjudicated,
       CASE WHEN a.answer IS NOT NULL THEN a.answer
            WHEN t.top_votes * 2 > t.n_readers THEN t.top_answer END AS consensus,
       CASE WHEN a.answer IS NOT NULL THEN 'adjudicated'
            WHEN t.top_votes * 2 > t.n_readers THEN 'majority'
            ELSE 'needs_adjudication' END AS status
FROM tally t FULL JOIN adjudicated a USING (site_id, batch_id, study_uid, item)
