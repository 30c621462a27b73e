// The rating page's client: the token stays in this tab (sessionStorage) and goes only in the Authorization
// header; text from the server is inserted with textContent, never as HTML.
"use strict";
let token = sessionStorage.getItem("token");
let current = null;
let imageUrls = [];
const $ = (id) => document.getElementById(id);

async function api(path, body) {
  const init = { headers: { Authorization: "Bearer " + token } };
  if (body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 401) { logout("That token is not valid."); throw new Error("unauthorized"); }
  return response;
}

function logout(message) {
  sessionStorage.removeItem("token");
  token = null;
  $("rate-view").classList.add("hidden");
  $("login-view").classList.remove("hidden");
  $("status").textContent = message || "";
}

function showProgress(p) {
  $("progress").textContent = `Round ${p.round}: ${p.done} of ${p.total} queries done (${p.ratings} ratings in all)`;
}

async function next() {
  const data = await (await api("/api/next")).json();
  $("login-view").classList.add("hidden");
  $("rate-view").classList.remove("hidden");
  $("who").textContent = "Rating as " + data.rater;
  showProgress(data.progress);
  const pairwise = data.mode === "pairwise";
  $("scores").classList.toggle("hidden", pairwise);
  $("choices").classList.toggle("hidden", !pairwise);
  $("images").classList.toggle("pair", pairwise);
  $("image2").classList.toggle("hidden", !pairwise);
  const scores = $("scores");
  if (!pairwise && !scores.childElementCount) {
    for (const v of data.scale) {
      const b = document.createElement("button");
      b.className = "score";
      b.dataset.value = String(v);
      b.textContent = String(v);
      b.addEventListener("click", () => submit({ value: v }));
      scores.appendChild(b);
    }
  }
  current = data.assignment;
  if (!current) {
    $("query").classList.add("hidden");
    $("waiting").classList.remove("hidden");
    setTimeout(() => next().catch(() => {}), 2000);
    return;
  }
  imageUrls.forEach((u) => URL.revokeObjectURL(u));
  imageUrls = [];
  for (const [n, path] of data.images.entries()) {
    const blob = await (await api(path)).blob();
    imageUrls.push(URL.createObjectURL(blob));
    $(n === 0 ? "image" : "image2").src = imageUrls[n];
  }
  $("image").dataset.assignment = current;
  $("prompt").textContent = data.prompt ? "Prompt: " + data.prompt : "";
  $("waiting").classList.add("hidden");
  $("query").classList.remove("hidden");
}

async function submit(answer) {
  if (!current) return;
  const sent = current;
  current = null;
  const response = await api("/api/rate", Object.assign({ assignment: sent }, answer));
  const data = await response.json();
  $("status").textContent = response.ok ? "" : data.error;
  await next();
}

$("login").addEventListener("click", () => {
  token = $("token").value.trim();
  sessionStorage.setItem("token", token);
  $("status").textContent = "";
  next().catch(() => {});
});
$("skip").addEventListener("click", () => submit({ skip: true }));
$("left").addEventListener("click", () => submit({ better: 0 }));
$("right").addEventListener("click", () => submit({ better: 1 }));

if (location.hash.startsWith("#token=")) {  // a login link: take the token, then drop it from the address bar
  token = decodeURIComponent(location.hash.slice(7));
  sessionStorage.setItem("token", token);
  history.replaceState(null, "", location.pathname);
}
if (token) next().catch(() => {});
