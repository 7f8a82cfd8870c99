#include "test_support.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "layerd/watch/watch.hpp"

namespace fs = std::filesystem;

namespace layerd::test {

std::optional<std::string> fuse_unavailable_reason() {
  if (::geteuid() != 0) return "needs root (mounts FUSE filesystems); run the suite as root";
  if (::access("/dev/fuse", R_OK | W_OK) != 0) return "needs /dev/fuse";
  if (std::system("command -v fuse-overlayfs >/dev/null 2>&1") != 0)
    return "needs fuse-overlayfs (apt-get install fuse-overlayfs)";
  return std::nullopt;
}

std::string make_temp_dir(const std::string& prefix) {
  std::string pattern = (fs::temp_directory_path() / (prefix + "-XXXXXX")).string();
  if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
  return pattern;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return "<cannot open " + path + ": " + std::strerror(errno) + ">";
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

void write_file(const std::string& path, const std::string& content) {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << content;
  if (!out) throw std::runtime_error("cannot write " + path);
}

std::vector<std::string> listing(const std::string& root) {
  std::vector<std::string> out;
  std::error_code ec;
  if (!fs::exists(fs::symlink_status(root, ec))) return out;
  for (auto it = fs::recursive_directory_iterator(root, fs::directory_options::none, ec);
       it != fs::recursive_directory_iterator(); it.increment(ec)) {
    if (ec) break;
    const auto status = it->symlink_status();
    std::string type = fs::is_symlink(status) ? "link->" + fs::read_symlink(it->path()).string()
                       : fs::is_directory(status) ? "dir"
                                                  : "file";
    std::string size = fs::is_regular_file(status) ? std::to_string(it->file_size()) : "-";
    out.push_back(fs::relative(it->path(), root).string() + " " + type + " " + size);
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<std::string> mounts_under(const std::string& prefix) {
  std::ifstream in("/proc/self/mountinfo");
  std::stringstream text;
  text << in.rdbuf();
  std::vector<std::string> out;
  for (const auto& entry : watch::parse_mountinfo(text.str())) {
    const std::string& point = entry.mount_point;
    if (point == prefix || point.rfind(prefix + "/", 0) == 0) out.push_back(point);
  }
  return out;
}

bool is_mounted(const std::string& mount_point) {
  auto mounts = mounts_under(mount_point);
  return std::find(mounts.begin(), mounts.end(), mount_point) != mounts.end();
}

namespace {

// A /proc file read with plain read(2): a process that exits while it is read makes read fail
// with ESRCH, which libstdc++'s filebuf turns into an exception that aborted the stress test.
// Here that is an empty result, as for a process already gone.
std::string read_proc_file(const std::string& path) {
  std::string out;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return out;
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n <= 0) {
      if (n < 0) out.clear();
      break;
    }
    out.append(buf, static_cast<std::size_t>(n));
  }
  ::close(fd);
  return out;
}

}  // namespace

std::vector<pid_t> fuse_server_pids(const std::string& home) {
  std::vector<pid_t> pids;
  std::error_code ec;
  const std::string canonical = fs::weakly_canonical(home, ec).string();
  for (const auto& entry : fs::directory_iterator("/proc", ec)) {
    const std::string name = entry.path().filename().string();
    if (!std::all_of(name.begin(), name.end(), ::isdigit)) continue;
    if (read_proc_file((entry.path() / "comm").string()) != "fuse-overlayfs\n") continue;
    // The mountpoint is its last argument: HOME/ID/merged.
    std::string cmdline = read_proc_file((entry.path() / "cmdline").string());
    while (!cmdline.empty() && cmdline.back() == '\0') cmdline.pop_back();
    const std::string target = cmdline.substr(cmdline.rfind('\0') + 1);
    if ((target.rfind(canonical + "/", 0) == 0 || target.rfind(home + "/", 0) == 0) &&
        process_exists(std::stoi(name)))
      pids.push_back(std::stoi(name));
  }
  return pids;
}

std::size_t fuse_servers_in(const std::string& home) { return fuse_server_pids(home).size(); }

bool process_exists(pid_t pid) {
  std::string line = read_proc_file("/proc/" + std::to_string(pid) + "/stat");
  auto close = line.rfind(')');
  if (close == std::string::npos || close + 2 >= line.size()) return false;
  return line[close + 2] != 'Z';
}

}  // namespace layerd::test
