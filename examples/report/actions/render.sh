# The context comes in on stdin; this step keeps it and adds the report's title.
request=$(cat)
rows=$(printf '%s' "$request" | sed -n 's/.*"rows":\([0-9]*\).*/\1/p')
echo "{\"event\": \"rendered\", \"context\": {\"rows\": ${rows:-0}, \"title\": \"Nightly report: ${rows:-0} rows\"}}"
