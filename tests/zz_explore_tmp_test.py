from conftest import post_form
def test_explore(app, client, auth):
    auth.signup()
    r = post_form(client, "/forms/new", {"name": "Contact", "allowed_domains": "ok.example", "honeypot_field": "_gotcha", "status": "active", "notify": "y"})
    pid = r.headers["Location"].rsplit("/", 1)[1]
    r = client.options(f"/f/{pid}", headers={"Origin": "https://ok.example", "Access-Control-Request-Method": "POST"})
    print(r.status_code, dict(r.headers))
    print(app.url_map)
    page = app.test_client().get(f"/f/{pid}").get_data(as_text=True)
    print([l for l in page.splitlines() if "csrf" in l])
